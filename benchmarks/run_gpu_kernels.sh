#!/usr/bin/env bash
# Issue 7 on a GPU, in one go: build the native op with CUDA, run the CUDA parity tests of the fused
# ops (Triton + native, compile, CUDA graphs), then the kernel microbenchmarks (compile provider
# last, so a timeout only loses those rows). Writes into OUTDIR:
#   env.json, native_build.log, gpu_ops_tests.xml, kernels.jsonl (rows as measured),
#   kernels.json (rows + speedup rows), kernels.md (table + goal checks)
#   bash benchmarks/run_gpu_kernels.sh OUTDIR [--bench-only]   # SOAR_FAST_BENCH_FULL=1: more shapes/dtypes
# --bench-only skips the parity tests (for a caller that already ran `pytest -m cuda tests`). The
# summary is rewritten after each stage, so an outer timeout keeps what was measured.
set -uo pipefail
OUT=${1:?usage: run_gpu_kernels.sh OUTDIR [--bench-only]}
MODE=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET SOAR_FAST_POISON_OUTPUTS
python -c "import torch, triton, json; print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)'}))" > "$OUT/env.json" || exit 1
# pytest-benchmark may be missing on the GPU image: clear the ini addopts (--benchmark-disable) and
# keep the plugin off; the rows carry do_bench quantiles.
PYTEST="python -m pytest -q -p no:cacheprovider -p no:benchmark -o addopts=-ra"
status=0
run() { echo "== $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }

# 1. Native op with CUDA kernels, built in the background while the Triton tests run.
BUILD=build/native_gpu
GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
( if command -v cmake >/dev/null && command -v nvcc >/dev/null; then
    timeout 240 cmake -S . -B "$BUILD" $GEN -DCMAKE_BUILD_TYPE=Release -DSOAR_FAST_NATIVE_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DSOAR_PYTHON="$(command -v python)" \
    && timeout 240 cmake --build "$BUILD" -j "$(nproc)"
  else echo "cmake or nvcc missing: native CUDA op not built"; exit 1; fi ) > "$OUT/native_build.log" 2>&1 &
build_pid=$!

# 2. CUDA parity tests of the fused ops (Triton; native below once built).
if [ "$MODE" != "--bench-only" ]; then
  run timeout 300 $PYTEST -m cuda tests/ops --junitxml="$OUT/gpu_ops_tests.xml"
fi
wait $build_pid && LIB="$BUILD/kernels/libsoar_fast_native.so" || LIB=""
if [ -n "$LIB" ] && [ -f "$LIB" ]; then
  export SOAR_FAST_NATIVE_LIB=$PWD/$LIB
  run timeout 120 $PYTEST -m cuda tests/ops -k native --junitxml="$OUT/gpu_native_tests.xml"
else
  echo "native build failed or skipped (see $OUT/native_build.log); benchmarks run without the native provider"
fi

# 3. Microbenchmarks: JSONL rows appended as measured.
export SOAR_FAST_BENCH_JSON="$OUT/kernels.jsonl"
summary() { python benchmarks/micro/summarize.py "$OUT/kernels.jsonl" --json "$OUT/kernels.json" --md "$OUT/kernels.md" > /dev/null; }
run timeout 400 $PYTEST benchmarks/micro -k "not torch_compile"
summary
run timeout 400 $PYTEST benchmarks/micro -k "torch_compile"
run python benchmarks/micro/summarize.py "$OUT/kernels.jsonl" --json "$OUT/kernels.json" --md "$OUT/kernels.md"
echo "kernels done (status $status); results in $OUT"
exit $status
