#!/usr/bin/env bash
# The GPU suite: GPU tests, kernel microbenchmarks, parity harness and the step benchmark,
# about 8-9 minutes on one H100/H200 (--quick: about 6). Writes JSON (and logs) into OUTDIR; commit them under
# benchmarks/results/<gpu>/ with the device, date and commit they carry.
#   bash benchmarks/run_gpu_suite.sh OUTDIR [--quick]
set -uo pipefail
OUT=${1:?usage: run_gpu_suite.sh OUTDIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
# The GPU image lacks diffusers and nvtx: install carried wheels (wheels/*.whl) without deps.
if ls wheels/*.whl >/dev/null 2>&1; then pip install --no-deps -q wheels/*.whl; fi
pip install --no-deps -q -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
python -c "import torch, triton, json; print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name()}))" > "$OUT/env.json"

status=0
run() { echo "== $*"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }

# 1. GPU tests (everything marked cuda), with a JUnit report.
run timeout 120 python -m pytest -q -m cuda tests --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider
# 2. Kernel microbenchmarks (issue 7), if present.
if [ -f benchmarks/run_gpu_kernels.sh ]; then run timeout 200 bash benchmarks/run_gpu_kernels.sh "$OUT" --bench-only; fi
# 3. Parity harness on the GPU (CUDA graph bitwise, FP8 v_cfg error on torch._scaled_mm).
run timeout 60 python -m soar_fast.fast.parity --device cuda --preset digits --batch 4 --json "$OUT/parity.json"
# 4. Step benchmark, SD3.5-M 512 px (and 1024 px unless --quick), attention backends compared.
run timeout 180 python benchmarks/bench_step.py --resolution 512 --batch 2 --out "$OUT/step_512.json" \
    --attention_backends sdpa,sdpa_flash,sdpa_cudnn,flash_attn
if [ "$QUICK" != "--quick" ]; then
  run timeout 80 python benchmarks/bench_step.py --resolution 1024 --batch 1 --variants a,d,sft,f --iters 5 \
      --out "$OUT/step_1024.json"
fi
echo "suite done (status $status); results in $OUT"
exit $status
