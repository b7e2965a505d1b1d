#!/usr/bin/env bash
# Builds tests/cpu/kernel_check.cpp with the CPU kernel levels of an architecture and runs it.
#
#   tests/cpu/cross_check.sh            # this machine's architecture
#   tests/cpu/cross_check.sh aarch64    # generic + NEON with aarch64-linux-gnu-g++, run under qemu
#                                       # (Debian: apt-get install g++-aarch64-linux-gnu qemu-user-static)
# The flags are those of setup.py's cpu_kernel_levels().
set -euo pipefail
cd "$(dirname "$0")/../.."
arch="${1:-$(uname -m)}"
out="$(mktemp -d)"
common=(-std=c++17 -O3 -ffp-contract=fast)
case "$arch" in
  x86_64)
    cxx=g++ run=()
    levels=("generic:" "avx2:-mavx2 -mfma" "avx512:-mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma") ;;
  aarch64)
    cxx=aarch64-linux-gnu-g++ run=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
    [ "$(uname -m)" = aarch64 ] && cxx=g++ run=()
    levels=("generic:" "neon:") ;;
  *) echo "unknown architecture $arch" >&2; exit 2 ;;
esac
objs=()
for lv in "${levels[@]}"; do
  name="${lv%%:*}"; flags="${lv#*:}"
  # shellcheck disable=SC2086
  "$cxx" "${common[@]}" $flags -c "csrc/cpu/kernels/$name.cpp" -o "$out/$name.o"
  objs+=("$out/$name.o")
done
"$cxx" "${common[@]}" tests/cpu/kernel_check.cpp "${objs[@]}" -o "$out/kernel_check"
echo "built for $arch: $(file -b "$out/kernel_check" | cut -d, -f1-2)"
"${run[@]}" "$out/kernel_check"
