#!/usr/bin/env bash
# GPU validation of vqfast, in stages short enough to run one at a time on a GPU machine:
#
#   scripts/gpu_check.sh build      build vqfast._C with the CUDA kernels (pip install -e .)
#   scripts/gpu_check.sh test       the whole test suite, GPU tests included
#   scripts/gpu_check.sh sanitize   compute-sanitizer memcheck / racecheck / synccheck / initcheck on
#                                   the torch-free kernel check, memcheck on the torch op
#   scripts/gpu_check.sh bench      vqfast bench --preset $PRESET (default gpu: one short command;
#                                   full: every shape, in several runs with --questions)
#   scripts/gpu_check.sh all        the four in order, then (only if every one passed) `record`
#   scripts/gpu_check.sh record     add this GPU's architecture to vqfast/gpu_validated.json for the
#                                   GPU backends that ran (commit the file): backend="auto" then
#                                   takes those kernels on this architecture
#
# Logs go to LOGS (default ./gpu-logs), benchmark records to RESULTS (default benchmarks/results);
# QUESTIONS (default: all) picks the benchmark questions.
# Every stage needs a CUDA torch and nvcc; the build uses the torch already installed.
set -euo pipefail

cd "$(dirname "$0")/.."
LOGS=${LOGS:-gpu-logs}
RESULTS=${RESULTS:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$LOGS"

need_gpu() {
  "$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
}

stage_build() {
  need_gpu
  # -v: pip shows the build's output, with its line "vqfast: CUDA kernels: ...".
  "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1 || {
    tail -50 "$LOGS/build.log"
    exit 1
  }
  grep -m1 "vqfast: CUDA kernels:" "$LOGS/build.log" || true
  "$PY" - <<'EOF'
import torch, vqfast
from vqfast import _ext
assert _ext.has_cuda_ext(), "vqfast._C has no CUDA kernels"
print("built for", vqfast.cuda_archs(), "; backends on cuda:", vqfast.available_backends("cuda"))
EOF
}

stage_test() {
  need_gpu
  "$PY" -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$LOGS/test.log" | tail -40
}

stage_sanitize() {
  need_gpu
  local exe="$LOGS/check_nearest_codeword"
  local cap
  cap=$("$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
  nvcc -std=c++17 -O2 -lineinfo -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -I csrc/cuda "-gencode=arch=compute_$cap,code=sm_$cap" \
    tests/cuda/check_nearest_codeword.cu csrc/cuda/nearest_codeword.cu -o "$exe"
  "$exe" >"$LOGS/check.log" 2>&1 || { tail -30 "$LOGS/check.log"; exit 1; }
  tail -1 "$LOGS/check.log"
  local status=0
  for tool in memcheck racecheck synccheck initcheck; do
    if compute-sanitizer --tool "$tool" --error-exitcode 1 "$exe" --small >"$LOGS/sanitizer-$tool.log" 2>&1; then
      echo "compute-sanitizer $tool: clean ($(grep -c ' ok ' "$LOGS/sanitizer-$tool.log") cases)"
    else
      echo "compute-sanitizer $tool: ERRORS (see $LOGS/sanitizer-$tool.log)"
      grep -m 20 "=========" "$LOGS/sanitizer-$tool.log" || true
      status=1
    fi
  done
  # The torch op end to end (norms, search, split-K merge, re-rank, epilogue) on both GPU backends.
  if compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" - >"$LOGS/sanitizer-op.log" 2>&1 <<'EOF'
import torch, vqfast
for backend in vqfast.available_backends("cuda"):
    for n, k, d, dtype in [(1, 70001, 64, torch.float32), (300, 4099, 33, torch.float16), (257, 1000, 64, torch.bfloat16)]:
        z = torch.randn(n, d, device="cuda").to(dtype)
        cb = torch.randn(k, d, device="cuda").to(dtype)
        for precision in ("exact", "fast"):
            vqfast.nearest_codeword(z, cb, precision=precision, backend=backend)
torch.cuda.synchronize()
print("op ok")
EOF
  then
    echo "compute-sanitizer memcheck (torch op): clean"
  else
    echo "compute-sanitizer memcheck (torch op): ERRORS (see $LOGS/sanitizer-op.log)"
    grep -m 20 "=========" "$LOGS/sanitizer-op.log" || true
    status=1
  fi
  return $status
}

stage_bench() {
  need_gpu
  local questions=()
  if [ -n "${QUESTIONS:-}" ]; then
    read -r -a questions <<<"$QUESTIONS"
    questions=(--questions "${questions[@]}")
  fi
  "$PY" -m vqfast.cli bench --preset "${PRESET:-gpu}" --device cuda --results-dir "$RESULTS" --quiet "${questions[@]}" \
    2>&1 | tee "$LOGS/bench-${PRESET:-gpu}.log" | tail -80
}

stage_record() {
  need_gpu
  # The GPU backends that the stages exercised (available here); the architecture from the device.
  "$PY" - "$(git rev-parse HEAD 2>/dev/null || echo unknown)" "$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)" <<'EOF'
import sys, torch, vqfast
from vqfast import backends
commit, dirty = sys.argv[1], int(sys.argv[2]) > 0
names = [n for n in vqfast.available_backends("cuda") if backends.REGISTRY[n].needs_gpu_validation]
if not names:
    sys.exit("gpu_check.sh record: no GPU backend is available here; nothing to record")
arch = backends.gpu_arch()
backends.record_validation(
    arch, names, torch.cuda.get_device_name(), commit + ("-dirty" if dirty else ""),
    "scripts/gpu_check.sh all: build, test, sanitize, bench",
    torch=torch.__version__, cuda=str(torch.version.cuda))
print(f"recorded {', '.join(names)} as validated on {arch} in {backends.VALIDATION_RECORD}")
EOF
}

case "${1:-all}" in
  build) stage_build ;;
  test) stage_test ;;
  sanitize) stage_sanitize ;;
  bench) stage_bench ;;
  record) stage_record ;;
  # Each stage in its own shell, so that `set -e` holds inside it (bash ignores it in functions
  # called from an && list); the record is written only after all four passed.
  all) for stage in build test sanitize bench record; do bash "$0" "$stage" || exit 1; done ;;
  *) echo "usage: $0 build|test|sanitize|bench|record|all" >&2; exit 2 ;;
esac
