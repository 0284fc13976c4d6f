#!/usr/bin/env bash
# One device check of the CUDA side, for a machine with one GPU and no network (fits in 8 minutes
# on an H100 with 16 cores):
#   1. build the extension in place with the CUDA kernels (TORCH_CUDA_ARCH_LIST, default 9.0)
#      against the installed torch;
#   2. the CUDA tests (every test marked `cuda`, and the CUDA kernel registration check);
#   3. compute-sanitizer memcheck and racecheck on benchmarks/gpu_smoke.py (each CUDA op once,
#      PyTorch's caching allocator off so out-of-bounds accesses are not hidden inside its blocks);
#   4. install a torch-ans wheel ($TORCH_ANS_WHEEL, else wheels/torch_ans-*.whl; skipped when neither
#      exists, the installed torch_ans is used);
#   5. the GPU benchmarks against torch_ans on the same GPU (bench_rans_cuda.py,
#      bench_rans_interleaved.py --device cuda), short runs;
#   6. the codec on the GPU (gpu_codec_check.py): CPU->GPU and GPU->CPU streams decode to the same
#      latents, the slice loops never synchronise, and a batch's throughput against the CPU.
# Every step runs under `timeout` and inside an overall budget ($GPU_CHECK_BUDGET_S, default 450 s);
# a failed step does not stop the next. The summary prints PASS / FAIL / SKIP per step; the exit
# status is non-zero when a step failed.
#
#     bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
LOG=${GPU_CHECK_LOG:-/tmp/gpu_check_logs}
mkdir -p "$LOG"
NAMES=()
RESULTS=()
TIMES=()

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout min(LIMIT_S, budget left), output to the
# terminal and to $LOG/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  ((limit > left)) && limit=$left
  local t0 rc
  t0=$(date +%s)
  echo
  echo "==== $name (limit ${limit}s) ===="
  if ((limit < 5)); then
    echo "no time left in the ${BUDGET}s budget"
    rc=125
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  NAMES+=("$name")
  TIMES+=($(($(date +%s) - t0)))
  if ((rc == 0)); then RESULTS+=(PASS)
  elif ((rc == 124 || rc == 137)); then RESULTS+=("FAIL (timeout)")
  elif ((rc == 125)); then RESULTS+=("FAIL (no time left)")
  else RESULTS+=("FAIL (rc $rc)")
  fi
}

skip() {
  echo
  echo "==== $1: SKIP ($2) ===="
  NAMES+=("$1")
  RESULTS+=("SKIP ($2)")
  TIMES+=(0)
}

echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET}s, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
command -v nvcc >/dev/null && nvcc --version | tail -1
$PY -c "import compressai" 2>/dev/null ||
  echo "note: compressai is not installed: tests/test_gaussian.py and tests/test_gdn.py skip as whole modules"

JOBS=$(nproc 2>/dev/null || echo 4)
step build 270 env FORCE_CUDA=1 MAX_JOBS="$JOBS" $PY setup.py build_ext --inplace
step build_info 30 $PY -c "
import dualres_ext, torch
info = dualres_ext.build_info()
print(info)
assert info['cuda'], 'the extension was built without CUDA'
assert torch.cuda.is_available(), 'no GPU visible'"

PYTEST=($PY -m pytest -q -p no:cacheprovider -rs)
step tests_cuda 150 "${PYTEST[@]}" -m cuda tests
step tests_registration 30 "${PYTEST[@]}" tests/test_rans_cuda.py::test_cuda_build_registers_cuda_kernels

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n "$SAN" ]]; then
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 3 \
      $PY benchmarks/gpu_smoke.py
  done
else
  step sanitizer_memcheck 5 sh -c 'echo "compute-sanitizer not found"; exit 2'
  step sanitizer_racecheck 5 sh -c 'echo "compute-sanitizer not found"; exit 2'
fi

WHEEL=${TORCH_ANS_WHEEL:-}
if [[ -z "$WHEEL" ]]; then
  WHEEL=$(ls wheels/torch_ans-*.whl 2>/dev/null | head -1)
fi
if [[ -n "$WHEEL" ]]; then
  step torch_ans_install 60 $PY -m pip install --no-deps --no-index --force-reinstall "$WHEEL"
else
  skip torch_ans_install "no \$TORCH_ANS_WHEEL and no wheels/torch_ans-*.whl; using the installed torch_ans, if any"
fi

step bench_rans_cuda 60 $PY benchmarks/bench_rans_cuda.py --reps 5 --batch 4 --lanes 0 1024 --no-compressai
step bench_rans_interleaved_cuda 90 $PY benchmarks/bench_rans_interleaved.py --device cuda --repeat 5 --groups 64 256
step codec_cuda 90 $PY benchmarks/gpu_codec_check.py --batch 16 --repeat 3

echo
echo "==== summary ($(($(date +%s) - START))s of ${BUDGET}s; logs in $LOG) ===="
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-28s %-12s %4ss\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
  [[ ${RESULTS[$i]} == FAIL* ]] && failed=1
done
exit $failed
