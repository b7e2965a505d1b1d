// Stand-in for the one header a CUDA build of torch generates at its build time and a CPU wheel
// does not ship; every other torch / c10 header binding.cpp includes is the installed torch's own.
// (A CUDA build's copy defines the same macro: the c10_cuda library is shared.)
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
