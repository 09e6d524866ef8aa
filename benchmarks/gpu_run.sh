#!/usr/bin/env bash
# One call on a GPU machine: install this checkout, run the GPU tests, run the per-op benchmark.
#   bash benchmarks/gpu_run.sh [tests|ops|all|e2e]  (results and logs go to $OUT, else ./out)
#   e2e: benchmarks/bench_pi05.py with $E2E_ARGS (e.g. "--phase cold --variant quantvla_w4a8").
#   attention: benchmarks/bench_attention.py --sweep.
# Kernel choices and tuned tiles persist between calls in .cache/quantvla (git-ignored) and are
# copied to $OUT/quantvla_cache at the end (the source of configs/tuned/<gpu>.json).
# Expects, beside the checkout (both git-ignored): .whl/ with the torchao and setuptools wheels the
# image lacks, and optionally .carry/ from ../shared/device/prepare_bitblas_carry.sh for BitBLAS.
set -euo pipefail
what=${1:-all}
out=${OUT:-out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/torchao-*.whl .whl/setuptools-*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
if [ -f .carry/env.sh ]; then
  source .carry/env.sh
  # Our BitBLAS build path compiles compute_80 PTX itself: drop the carry's nvcc wrapper from PATH.
  PATH=$(echo "$PATH" | tr ':' '\n' | grep -v '/\.carry/bin$' | paste -sd: -); export PATH
fi
export QUANTVLA_CACHE_DIR=${QUANTVLA_CACHE_DIR:-$PWD/.cache/quantvla}
trap 'mkdir -p "$out/quantvla_cache" && cp -r "$QUANTVLA_CACHE_DIR"/. "$out/quantvla_cache"/ 2>/dev/null || true' EXIT
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt" || true
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/env.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  # shellcheck disable=SC2046  # every GPU test file, plus the kernel tests that run on CUDA when present
  python3 -m pytest -q -p no:cacheprovider -rs $(ls tests/test_*gpu*.py) tests/test_triton_w4a8.py \
    tests/test_bitblas_kernel.py tests/test_auto_select.py tests/test_kernel_support.py tests/test_w4a16.py \
    2>&1 | tee "$out/gpu_tests.log"
fi
if [ "$what" = ops ] || [ "$what" = all ]; then
  # KERNELS may add weight-only runs (w4a16_triton, w4a16_auto); MS the token counts (e.g. 1,10,50,968).
  python3 benchmarks/bench_ops.py --kernels "${KERNELS:-triton,bitblas}" --ms "${MS:-10,50,968}" --out "$out/results" 2>&1 | tee "$out/bench_ops.log"
  python3 benchmarks/plot_results.py "$out/results/$(ls "$out/results" | head -1)"
fi
if [ "$what" = attention ]; then
  python3 benchmarks/bench_attention.py --sweep --out "$out/results" 2>&1 | tee "$out/bench_attention.log"
fi
if [ "$what" = e2e ]; then
  # shellcheck disable=SC2086  # E2E_ARGS is a list of arguments
  python3 benchmarks/bench_pi05.py ${E2E_ARGS:-} --out "$out/results" 2>&1 | tee -a "$out/bench_pi05.log"
fi
