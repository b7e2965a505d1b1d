"""vqfast: fast fused nearest-codeword search and drop-in vector quantizers for PyTorch."""
from vqfast._ext import cpu_isa, cuda_archs, has_cuda_ext, has_ext
from vqfast.backends import available_backends
from vqfast.modules import ResidualVectorQuantizer, VectorQuantizer, VectorQuantizer2
from vqfast.ops import nearest_codeword
from vqfast.compat import accelerate

__version__ = "0.1.0"

__all__ = [
    "nearest_codeword",
    "accelerate",
    "available_backends",
    "has_ext",
    "has_cuda_ext",
    "cpu_isa",
    "cuda_archs",
    "VectorQuantizer",
    "VectorQuantizer2",
    "ResidualVectorQuantizer",
]
