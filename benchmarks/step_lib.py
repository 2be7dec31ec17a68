"""What the step benchmark (`bench_step.py`) and the trainer end-to-end benchmark (`bench_train.py`)
share: the variants as `TrainConfig`s (so a benchmarked step is one `soar-fast train` can run),
the precision policies, timing, the measured GEMM peak and the row bookkeeping.

A variant spec is `name[:precision]`, e.g. `e` or `e:pure_bf16`; the precision defaults to
`--precision`. Policies: `trainer` = what `soar-fast train --mixed_precision bf16` does (fp32
master weights and AdamW states, bf16 compute through FSDP2's MixedPrecisionPolicy, fp32
gradient reduction), `pure_bf16` = bf16 weights and AdamW states (`--runtime.weight_dtype bf16`),
`fp32` = no mixed precision (the CPU smoke runs).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import soar_fast as sf
from soar_fast.config import TrainConfig
from soar_fast.config.fast import FastConfig

# name -> (description, FastConfig overrides, SOAR?) ; each adds one thing to the one before (b..f)
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "a": ("baseline (reference-release structure)", {}, True),
    "b": ("eager batched step", {"ops_backend": "reference"}, True),
    "c": ("+ fused kernels", {}, True),
    "sft_eager": ("SFT step (settings of c)", {}, False),
    "d": ("+ compile (per block)", {"compile": "per_block"}, True),
    "e": ("+ CUDA-graph rollout", {"compile": "per_block", "rollout": "cuda_graph"}, True),
    "f": ("+ FP8 rollout (CUDA graph)", {"compile": "per_block", "rollout": "cuda_graph_fp8"}, True),
    "g": ("+ FP8 training GEMMs (bf16 graph rollout)", {"compile": "per_block", "rollout": "cuda_graph",
                                                       "fp8_training": True}, True),
    "g_ao": ("+ torchao float8 training GEMMs, rowwise (bf16 graph rollout)",
             {"compile": "per_block", "rollout": "cuda_graph", "fp8_training": True,
              "fp8_training_backend": "torchao", "fp8_scaling": "rowwise"}, True),
    "sft": ("SFT step (settings of d)", {"compile": "per_block"}, False),
}
# precision -> (runtime.mixed_precision, runtime.weight_dtype)
PRECISIONS = {"trainer": ("bf16", "fp32"), "pure_bf16": ("bf16", "bf16"), "fp32": ("no", "fp32")}


@dataclass(frozen=True)
class Shape:
    """The benchmark's problem: model, per-rank batch, auxiliary points, latent side, text length, video frames,
    LoRA rank (0: full fine-tune), activation checkpointing."""

    family: str = "sd3"
    preset: str = "sd35-medium"
    batch: int = 2
    num_aux: int = 6
    latent: int = 64
    text_len: int = 154
    micro_chunks: int = 1
    frames: int = 0
    """Latent frames of a video family's clips (Wan); 0 = images."""
    lora_rank: int = 0
    activation_checkpointing: bool = False
    extra: dict = field(default_factory=dict)


def parse_variant(spec: str, default_precision: str) -> tuple[str, str]:
    """`e:pure_bf16` -> ('e', 'pure_bf16'); `e` -> ('e', default_precision)."""
    name, _, precision = spec.partition(":")
    precision = precision or default_precision
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} in {spec!r}; choose from {', '.join(PRECISIONS)}")
    return name, precision


def variant_config(name: str, precision: str, shape: Shape, device: str, *, compile_off: bool = False,
                   learning_rate: float = 1e-5) -> TrainConfig:
    """The `TrainConfig` of a variant: synthetic latents of `shape`, the variant's fast options,
    the precision policy. (a) is not built from it (it re-creates the release's structure) but
    takes its precision and SOAR settings."""
    _desc, fast, soar = VARIANTS[name]
    mixed, weights = PRECISIONS[precision]
    if compile_off:
        fast = {**fast, "compile": "none"}
    cfg = TrainConfig()
    cfg.recipe = f"bench-{name}"
    cfg.model = dataclasses.replace(cfg.model, family=shape.family, preset=shape.preset, lora_rank=shape.lora_rank)
    cfg.data = dataclasses.replace(cfg.data, source="synthetic", latent_size=shape.latent, prompt_tokens=shape.text_len,
                                   latent_frames=shape.frames, num_samples=max(64, 32 * shape.batch))
    cfg.optim = dataclasses.replace(cfg.optim, train_batch_size=shape.batch, learning_rate=learning_rate)
    cfg.soar = sf.SoarConfig(num_aux=shape.num_aux if soar else 0)
    cfg.runtime = dataclasses.replace(cfg.runtime, step="eager" if name == "a" else "fast", device=device,
                                      mixed_precision=mixed, weight_dtype=weights)
    cfg.fast = dataclasses.replace(FastConfig(), micro_chunks=shape.micro_chunks,
                                   activation_checkpointing=shape.activation_checkpointing, **fast)
    return cfg


def step_inputs(cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, tuple, tuple]:
    """`(z0, cond, uncond)` on `device`: one batch of `train_batch_size` rows of the config's
    (synthetic) data, shaped for its model family and preset."""
    from soar_fast.data import build_dataset
    from soar_fast.models.spec import get_family

    family = get_family(cfg.model.family)
    mc = family.build(cfg.model.preset, seed=0, device="meta").config
    text_dim, pooled_dim = family.text_dims(mc)
    data = build_dataset(cfg.data, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
                         latent_channels=family.latent_channels(mc))
    z0, cond, _ = data.batch(torch.arange(cfg.optim.train_batch_size))
    return z0.to(device), tuple(t.to(device) for t in cond), tuple(t.to(device) for t in data.uncond())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of `iters` calls of `fn` after `warmup` calls, synchronised each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return qs[1], statistics.median(xs), qs[7]  # p20, p50, p80


def measure_bf16_gemm_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """The bf16 GEMM rate of this device, measured now (the MFU denominator; fp32 at 512 on CPU)."""
    if device.type != "cuda":
        n, dtype = 512, torch.float32
    else:
        dtype = torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = time_steps(lambda: a @ b, device, 3, iters)
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def measure_fp8_gemm_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float | None:
    """The FP8 (e4m3, per-tensor scales, fast accumulation) GEMM rate of `torch._scaled_mm`,
    measured now: the denominator of the FP8 variants' second MFU. None where it does not run
    (n = 512 on a CPU, where recent torch runs float8 `_scaled_mm` too)."""
    if device.type != "cuda":
        n = 512
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)
        mm = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,  # noqa: E731
                                      use_fast_accum=device.type == "cuda")
        times = time_steps(mm, device, 3, iters)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


#: the variants whose GEMMs (some of them) run in FP8: their rows add an MFU against the FP8 rate
FP8_VARIANTS = ("f", "g", "g_ao")


def env_info(device: torch.device) -> dict:
    # SOAR_FAST_COMMIT wins: a copied working tree (the GPU machine's) can carry stale git metadata
    commit = os.environ.get("SOAR_FAST_COMMIT")
    try:
        commit = commit or subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                   stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001
        triton_v = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_v,
            "cuda": torch.version.cuda, "commit": commit, "date": dt.date.today().isoformat()}


class Results:
    """JSON rows, rewritten to `path` after every addition: a run cut off by a timeout keeps what
    it measured."""

    def __init__(self, path: str | Path | None):
        self.rows: list[dict] = []
        self.path = Path(path) if path else None

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rows, indent=1))


def free_memory(device: torch.device) -> None:
    """Between variants: forget compiled graphs (each variant compiles its own model) and cached blocks."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the memory planner's rows (`bench_step.py --plan_only`) ------------------------------------
#: Variants that ran after (f) on the one module the 2026-11-26 benchmark reused: f's FP8 rollout
#: copies stayed attached (run 1: a b c sft_eager d e f g sft; run 2: a b c d e f sft).
_AFTER_F = ("g", "sft")
PLAN_HARNESSES = ("trainer", "2026-11-26")


def plan_harness(name: str, harness: str = "trainer"):
    """The `soar_fast.train.plan.Harness` of variant `name`: the step as the code of today builds it
    (`trainer`: build_train_step's FSDP2, foreach AdamW, rollout replica; (a) is the plain-module
    release structure of `bench_step.release_style_step`), or as the benchmark that wrote the
    2026-11-26 H200 rows ran it (`2026-11-26`, commit e2e6267: one plain bf16 module reused by every
    variant, fused AdamW, the rollout engine on the training module)."""
    from soar_fast.train.plan import Harness

    if harness == "2026-11-26":
        return Harness(fsdp=False, fused_adamw=True, replica=False, recorded_rollout=name == "a",
                       carried_fp8=name in _AFTER_F, name="bench@e2e6267")
    if harness != "trainer":
        raise ValueError(f"unknown plan harness {harness!r}; choose from {', '.join(PLAN_HARNESSES)}")
    if name == "a":
        return Harness(fsdp=False, replica=False, recorded_rollout=True, name="release_structure")
    return Harness()


def plan_rows(specs: list[str], default_precision: str, shape: Shape, info: dict, harness: str = "trainer",
              world_size: int = 1) -> list[dict]:
    """One `predicted_peak_gib` row per variant spec, keyed like the measured rows."""
    from soar_fast.train.plan import GIB, plan_memory
    from soar_fast.train.step import precision_dtypes

    rows = []
    for spec in specs:
        name, precision = parse_variant(spec, default_precision)
        cfg = variant_config(name, precision, shape, "cpu")
        plan = plan_memory(cfg, world_size, harness=plan_harness(name, harness))
        weight, compute, reduce = (str(d).removeprefix("torch.") for d in precision_dtypes(cfg))
        fast = cfg.fast
        config = {"step": "release_structure" if name == "a" else cfg.runtime.step, "rollout": fast.rollout,
                  "compile": fast.compile, "precision": precision, "weight_dtype": weight, "compute_dtype": compute,
                  "reduce_dtype": reduce, "fp8_training": fast.fp8_training,
                  "activation_checkpointing": fast.activation_checkpointing, "micro_chunks": fast.micro_chunks,
                  "world_size": world_size, "harness": plan_harness(name, harness).name}
        s = plan.stats
        rows.append({"bench": "soar_step", "provider": spec, "variant": name, "variant_desc": VARIANTS[name][0],
                     "model": f"{shape.family}/{shape.preset}",
                     "shape": f"B{shape.batch}x{(s.latent_channels, shape.latent, shape.latent)}+txt{shape.text_len}",
                     "num_aux": cfg.soar.num_aux, "precision": precision,
                     "dtype": "fp32" if precision == "fp32" else "bf16", "metric": "predicted_peak_gib",
                     "value": plan.peak_gib, "unit": "GiB", "phase": plan.phase,
                     "parts_gib": {k: v / GIB for k, v in plan.parts.items()}, "config": config,
                     "note": "soar_fast.train.plan on a CPU (meta-device measurement + fitted constants)", **info})
    return rows


# --- the profile breakdown of a step (issue 18): where the step's time goes -----------------------
#: rows of the breakdown, in the order they are printed; "idle" is the step time no kernel covers
PROFILE_CATEGORIES = ("gemm", "attention", "elementwise", "optimizer", "rollout", "soar_ops", "idle")
# the step's own ranges (soar_fast.fast.profiling.nvtx_range, record_function under the profiler)
_RANGE_CATEGORY = {"soar/rollout": "rollout", "soar/refresh": "rollout", "soar/optimizer": "optimizer",
                   "soar/aux_states": "soar_ops", "soar/loss_and_grad": "soar_ops"}
_GEMM = ("gemm", "matmul", "_mm", "addmm", "bmm", "linear", "cutlass", "xmma", "nvjet", "cublas", "scaled_mm",
         "sm90_", "sm80_", "ampere_")
_ATTENTION = ("attention", "flash", "fmha", "sdpa", "cudnn", "softmax")


def _kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _GEMM):
        return "gemm"
    return "elementwise"


def profile_breakdown(events, wall_ms: float, steps: int) -> dict[str, float]:
    """Milliseconds per step of each `PROFILE_CATEGORIES` row, from a torch.profiler's `events()`.

    Every unit of device work is counted once: on CUDA each kernel at the op that launched it
    (`self_device_time_total`, kernel names classify it), on a CPU each op's self time (op names
    classify it). A kernel under one of the step's ranges (the rollout and the FP8 weight refresh,
    the optimizer with clipping and EMA, the fused SOAR ops) takes the range's row, whatever it
    is; the rest are GEMM, attention, or norms/modulation/elementwise by name. The backward runs
    outside the ranges (autograd's thread): its GEMMs are GEMMs. `idle` = wall time minus all work."""
    out = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    cuda = any(getattr(e, "kernels", None) for e in events)

    def walk(e, inherited):
        cat = inherited or _RANGE_CATEGORY.get(e.name) or ("optimizer" if e.name.startswith("Optimizer.") else None)
        if cuda:
            for k in getattr(e, "kernels", ()) or ():
                out[cat or _kind(k.name)] += k.duration / 1e3
        elif not e.cpu_children or e.self_cpu_time_total > 0:
            if not e.name.startswith(("soar/", "Optimizer.", "ProfilerStep")):
                out[cat or _kind(e.name)] += e.self_cpu_time_total / 1e3
        for child in e.cpu_children:
            walk(child, cat)

    for e in events:
        if e.cpu_parent is None and getattr(e, "device_type", None) is not None and e.device_type.name == "CPU":
            walk(e, None)
    work = sum(out.values())
    out["idle"] = max(0.0, wall_ms * steps - work)
    return {k: v / steps for k, v in out.items()}


def profile_steps(fn, device: torch.device, steps: int) -> tuple[dict[str, float], float]:
    """Run `fn` `steps` times under torch.profiler: (`profile_breakdown` ms per step, wall ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    return profile_breakdown(prof.events(), wall, steps), wall
