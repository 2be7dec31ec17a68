#!/usr/bin/env bash
# The GPU suite, sized for one device call: the step benchmark, `soar-fast train` end to end, the parity
# harness, the rollout and attention benchmarks, the GPU tests, the kernel microbenchmarks, then 1024 px. Each stage runs
# under its own timeout, clipped to what is left of BUDGET seconds (default 540), most valuable
# first: a cut-off run keeps every stage before the cut. Every stage writes JSON into OUTDIR as it
# goes; `benchmarks/summarize_gpu.py OUTDIR` prints the tables (also run at the end).
#   bash benchmarks/run_gpu_suite.sh OUTDIR [BUDGET_S]     (SUITE=families: the per-family step rows instead)
# Commit OUTDIR under benchmarks/results/<gpu>/: the rows carry device, date and commit. A copied
# working tree (the device tool's) can carry stale git metadata: set SOAR_FAST_COMMIT=<hash> then.
# The GPU image lacks diffusers (and its lazy-importer, importlib_metadata), nvtx and torchao (variant
# g_ao): put their wheels in wheels/ (README "Performance"); they are installed with --no-deps into /tmp/site.
set -uo pipefail
OUT=${1:?usage: run_gpu_suite.sh OUTDIR [BUDGET_S]}
BUDGET=${2:-540}
T0=$(date +%s)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET SOAR_FAST_POISON_OUTPUTS
export PYTHONUNBUFFERED=1
if ls wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site wheels/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=python3
# Without a GPU (a dry run of this script) the benchmarks run their tiny smoke configs on the CPU.
SMOKE=""; DEV=cuda
$PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { SMOKE="--smoke --no_compile"; DEV=cpu; export TRITON_INTERPRET=1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
$PY -c "import os, torch, triton, json, subprocess; print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)', 'commit': os.environ.get('SOAR_FAST_COMMIT') or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}))" > "$OUT/env.json"
cat "$OUT/env.json"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
status=0
# stage NAME MAX_SECONDS CMD...: runs CMD under min(MAX, time left); logs rc and seconds to stages.txt
stage() {
  local name=$1 max=$2; shift 2
  local l; l=$(left); local t=$(( l < max ? l : max ))
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, budget spent"; echo "$name skipped" >> "$OUT/stages.txt"; return; fi
  echo "== $name (up to ${t} s, $(left) s left)"
  local s; s=$(date +%s)
  timeout -k 5 "$t" "$@"; local rc=$?
  [ $rc -ne 0 ] && status=1
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a "$OUT/stages.txt"
}

BENCH="$PY benchmarks/bench_step.py $SMOKE"
# SUITE=families (issue 16): instead of the stages below, the step of each family's real config that fits
# one GPU (random weights, B=1, M=6, 512 px; LoRA 64 but Wan 2.1-1.3B full at 33 frames; activation
# checkpointing where the planner predicts more than one H200 without it: `bench_step.py --plan_only`),
# (a) the reference-release structure and (c) the fast step uncompiled; FAMILY_VARIANTS overrides.
if [ "${SUITE:-all}" = families ]; then
  F="--batch 1 --resolution 512 --warmup 2 --iters 5 --variants ${FAMILY_VARIANTS:-a,c}"
  stage family_sd3 100 $BENCH --family sd3 --preset sd35-large --lora_rank 64 --text_len 154 $F --out "$OUT/family_sd3.json"
  stage family_zimage 100 $BENCH --family zimage --preset z-image --lora_rank 64 --text_len 154 $F --out "$OUT/family_zimage.json"
  stage family_wan 100 $BENCH --family wan --preset wan2.1-t2v-1.3b --frames 9 --text_len 512 --activation_checkpointing $F \
      --out "$OUT/family_wan.json"
  stage family_flux2 100 $BENCH --family flux2 --preset flux2-klein-4b --lora_rank 64 --text_len 512 --activation_checkpointing \
      $F --out "$OUT/family_flux2.json"
  stage family_flux 120 $BENCH --family flux --preset flux1-dev --lora_rank 64 --text_len 512 $F --out "$OUT/family_flux.json"
  stage family_qwenimage 120 $BENCH --family qwenimage --preset qwen-image --lora_rank 64 --text_len 154 \
      --activation_checkpointing $F --out "$OUT/family_qwenimage.json"
  $PY benchmarks/summarize_gpu.py "$OUT" | tee "$OUT/summary.md"
  echo "families done in $(( $(date +%s) - T0 )) s (status $status); results in $OUT"
  exit $status
fi

# The native op (C++/CUDA, issue 7) builds in the background on a few cores meanwhile.
BUILD=build/native_gpu
( GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
  timeout 150 nice -n 19 cmake -S . -B "$BUILD" $GEN -DCMAKE_BUILD_TYPE=Release -DSOAR_FAST_NATIVE_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DSOAR_PYTHON="$(command -v $PY)" \
  && timeout 240 nice -n 19 cmake --build "$BUILD" -j 4 ) > "$OUT/native_build.log" 2>&1 &
build_pid=$!

# 1. The step table, SD3.5-M 512 px, B=2, M=6 (issues 8, 12, 18), with the profile breakdown of (e), (g)
#    and (g_ao) (3 profiled steps each, after their timing): variants a..g built by
#    build_train_step in the trainer's precision policy, plus (e) in the old pure-bf16 one; each
#    variant builds and compiles its own model, so warm-ups are longer than 0.1's.
stage step_512 300 $BENCH --resolution 512 --batch 2 --warmup 2 --iters 6 --time_budget 230 \
    --variants a,b,c,sft_eager,d,e,e:pure_bf16,f,g,g_ao,sft --profile 3 --profile_variants e,g,g_ao --out "$OUT/step_512.json"
# 2. soar-fast train end to end on the same TrainConfig as (e) (goal: >= 95% of its samples/s).
stage train_e2e 150 $PY benchmarks/bench_train.py $SMOKE --variant e --resolution 512 --batch 2 --warmup 2 --iters 6 \
    --steps 20 --out "$OUT/train_e.json"
# 3. Parity on the GPU: CUDA graph bitwise, FP8 v_cfg on torch._scaled_mm, batched/compiled (fp32).
stage parity 60 $PY -m soar_fast.train.parity --device $DEV --preset digits --batch 4 --json "$OUT/parity.json"
# 4. The rollout alone per engine mode + FP8 refresh cost; fwd+bwd per attention backend.
stage rollout_attention 60 $BENCH --resolution 512 --batch 2 --variants "" --iters 10 \
    --rollout_modes eager,cuda_graph,fp8,cuda_graph_fp8 --attention_backends sdpa,sdpa_flash,sdpa_cudnn,sdpa_efficient,flash_attn \
    --out "$OUT/rollout_attention_512.json"
# 5. GPU tests (everything marked cuda).
PYTEST="$PY -m pytest -q -p no:cacheprovider -o addopts=-ra"
stage gpu_tests 120 $PYTEST -m cuda tests --junitxml="$OUT/gpu_tests.xml"
# 5b. The memory planner's choice per GPU size (issue 17): SD3.5-M SOAR 512 px M=6 B=2 under
#     set_per_process_memory_fraction for 24, 48 and 80 GiB, measured peak beside the prediction.
stage memory_fit 100 $PY benchmarks/bench_memory.py $( [ -n "$SMOKE" ] && echo --smoke ) --gpu_memory 24,48,80 \
    --out "$OUT/memory_fit.json"
# 6. Kernel microbenchmarks (issue 7), the native op's CUDA tests once it is built.
wait $build_pid && [ -f "$BUILD/kernels/libsoar_fast_native.so" ] && export SOAR_FAST_NATIVE_LIB=$PWD/$BUILD/kernels/libsoar_fast_native.so
echo "native lib: ${SOAR_FAST_NATIVE_LIB:-not built (see native_build.log)}"
[ -n "${SOAR_FAST_NATIVE_LIB:-}" ] && stage native_tests 40 $PYTEST -m cuda tests/ops -k native --junitxml="$OUT/gpu_native_tests.xml"
export SOAR_FAST_BENCH_JSON="$OUT/kernels.jsonl"
stage kernels 90 $PYTEST -p no:benchmark benchmarks/micro -k "not torch_compile"
# 7. 1024 px (B=1): the baseline, eager batched and the FP8 rollout step.
stage step_1024 80 $BENCH --resolution 1024 --batch 1 --variants a,c,sft_eager,d,f --warmup 2 --iters 4 --time_budget 40 \
    --out "$OUT/step_1024.json"
# 8. The torch.compile provider of the kernel microbenchmarks, with what is left.
stage kernels_compile 120 $PYTEST -p no:benchmark benchmarks/micro -k "torch_compile"
$PY benchmarks/micro/summarize.py "$OUT/kernels.jsonl" --json "$OUT/kernels.json" --md "$OUT/kernels.md" > /dev/null 2>&1
$PY benchmarks/summarize_gpu.py "$OUT" | tee "$OUT/summary.md"
echo "suite done in $(( $(date +%s) - T0 )) s (status $status); results in $OUT"
exit $status
