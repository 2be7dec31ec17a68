"""End-to-end SOAR step benchmark: the SD3.5-Medium transformer (real config, random weights).

Variants, each adding one thing to the one before (b..f) and compared with (a):
  a  baseline mirroring the reference release: rollout with autograd recording, the M auxiliary
     passes one by one, targets formed in bf16
  b  our eager batched step: one (1+M)B pass, no-grad rollout, fp32 targets (reference ops)
  c  + fused kernels (ops backend auto: Triton on CUDA)
  d  + torch.compile per transformer block
  e  + CUDA-graph rollout
  f  + FP8 rollout (CUDA graph of the FP8 rollout; torch._scaled_mm)
  g  + FP8 for the training GEMMs too (our torch._scaled_mm linear: e4m3 forward, e5m2 grads)
  sft the SFT step (M = 0) with the settings of d, for the SOAR/SFT ratio (sft_eager: settings of c)
Reported per variant: ms/step (p20/p50/p80), samples/s, peak memory, MFU against the bf16 GEMM
rate measured in the same run (FLOPs from soar_fast.fast.flops), speedup over (a), warm-up time
(compile included) and the rollout alone in the variant's settings. `--rollout_modes` times the
rollout per engine mode (uncompiled) and the FP8 weight refresh; `--attention_backends` the
forward+backward per attention backend. A failing variant is recorded as an error row and the
run goes on; the JSON is rewritten after every variant.

  python benchmarks/bench_step.py --out results.json                 # GPU, SD3.5-M, 512 px
  python benchmarks/bench_step.py --smoke --out smoke.json           # CPU, tiny config
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import soar_fast as sf
from soar_fast.fast import RolloutEngine, batched_soar_step
from soar_fast.fast.compile import compile_model
from soar_fast.fast.fp8 import enable_fp8_training
from soar_fast.loss.cond import broadcast_uncond, cat_cond
from soar_fast.models import SD3VelocityFn, build_sd3_transformer
from soar_fast.models.spec import get_family

# Cheapest first (a timeout keeps the most); sft_eager is SFT in the settings of c, sft in those of d.
VARIANTS = ("a", "b", "c", "sft_eager", "d", "e", "f", "g", "sft")
DESCRIPTION = {
    "a": "baseline (reference-release structure)",
    "b": "eager batched step",
    "c": "+ fused kernels",
    "d": "+ compile (per block)",
    "e": "+ CUDA-graph rollout",
    "f": "+ FP8 rollout",
    "g": "+ FP8 training GEMMs",
    "sft": "SFT step (settings of d)",
    "sft_eager": "SFT step (settings of c)",
}


def release_style_step(vf, z0, cond, uncond, config, draws, dtype):
    """SOAR as the reference release structures it: rollout with autograd recording, M separate
    auxiliary passes, targets in the model dtype. Same math; the baseline of the benchmark."""
    b, m, g = z0.shape[0], config.num_aux, config.guidance_scale
    view = lambda s: s.to(dtype).view(-1, 1, 1, 1)  # noqa: E731
    z0b, z1 = z0.to(dtype), draws.z1.to(dtype)
    z_t = (1 - view(draws.sigma0)) * z0b + view(draws.sigma0) * z1
    v = vf(z_t, draws.sigma0, cond)
    loss_main = (v.float() - (z1 - z0b).float()).square().flatten(1).mean(1).sum()
    loss_aux = torch.zeros((), device=z0.device)
    if m > 0:
        ub = broadcast_uncond(uncond, cond, b)
        out = vf(torch.cat([z_t, z_t]), torch.cat([draws.sigma0, draws.sigma0]), cat_cond(ub, cond))  # recorded
        v_u, v_c = out.chunk(2)
        v_cfg = (v_u + g * (v_c - v_u)).detach()
        z_hat = z_t + (view(draws.sigma1) - view(draws.sigma0)) * v_cfg
        for i in range(m):
            sa = draws.sigma_aux[i]
            alpha = ((sa - draws.sigma1) / (1 - draws.sigma1).clamp_min(1e-8)).clamp(0, 1)
            z_p = ((1 - view(alpha)) * z_hat + view(alpha) * z1).detach()
            v_corr = (z_p - z0b) / view(sa)
            v_pred = vf(z_p, sa, cond)
            loss_aux = loss_aux + (v_pred.float() - v_corr.float()).square().flatten(1).mean(1).sum()
    loss = (loss_main + config.lambda_aux * loss_aux) / (b + config.lambda_aux * m * b)
    loss.backward()
    return loss.detach()


def _make_step(variant, vf, engine, opt, gen, z0, cond, uncond, config, dtype, ops_backend, micro_chunks):
    """One full training step of `variant` (draws, loss + backward, optimizer, FP8 refresh)."""

    def step():
        draws = sf.sample_draws(z0, config, gen)
        opt.zero_grad(set_to_none=True)
        if variant == "a":
            release_style_step(vf, z0, cond, uncond, config, draws, dtype)
        else:
            batched_soar_step(vf, z0, cond, uncond, config, draws, rollout=engine,
                              ops_backend=ops_backend, micro_chunks=micro_chunks)
        opt.step()
        if engine is not None:
            engine.after_optimizer_step()

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step_fn, device, warmup, iters):
    for _ in range(warmup):
        step_fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _quantiles(xs):
    qs = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return qs[1], statistics.median(xs), qs[7]  # p20, p50, p80


def measure_bf16_gemm_tflops(device, n=8192, iters=20):
    """The bf16 GEMM rate of this device, measured now (the MFU denominator)."""
    if device.type != "cuda":
        n, dtype = 512, torch.float32
    else:
        dtype = torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = _time_steps(lambda: a @ b, device, 3, iters)
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def env_info(device):
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
    """JSON rows, rewritten to `path` after every variant: a run cut off by a timeout keeps what it
    measured."""

    def __init__(self, path):
        self.rows: list[dict] = []
        self.path = Path(path) if path else None

    def add(self, rows):
        self.rows += rows
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rows, indent=1))


def _inputs(args, mcfg, device, latent):
    g = torch.Generator(device=device).manual_seed(0)
    z0 = torch.randn(args.batch, mcfg.in_channels, latent, latent, device=device, generator=g)
    cond = (torch.randn(args.batch, args.text_len, mcfg.joint_attention_dim, device=device, generator=g),
            torch.randn(args.batch, mcfg.pooled_projection_dim, device=device, generator=g))
    uncond = (torch.zeros(args.text_len, mcfg.joint_attention_dim, device=device),
              torch.zeros(mcfg.pooled_projection_dim, device=device))
    return z0, cond, uncond


def run(args, results: Results | None = None) -> list[dict]:
    results = results or Results(None)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    preset = "tiny" if args.smoke else args.preset
    latent = args.resolution // 8
    if args.smoke:
        latent, args.text_len = 8, 7
    model = build_sd3_transformer(preset, seed=0, device=device).to(dtype=dtype)
    mcfg = model.config
    z0, cond, uncond = _inputs(args, mcfg, device, latent)
    peak_tflops = measure_bf16_gemm_tflops(device)
    env = env_info(device)
    shape = f"B{args.batch}x{mcfg.in_channels}x{latent}x{latent}+txt{args.text_len}"
    t_start = time.perf_counter()
    print(f"{preset} {shape} M={args.num_aux} {args.dtype} on {env['device']}; bf16 GEMM {peak_tflops:.0f} TFLOP/s",
          flush=True)
    results.add([{"bench": "bf16_gemm_8192", "provider": "torch", "metric": "tflops", "value": peak_tflops,
                  "unit": "TFLOP/s", "dtype": "bf16", "shape": "8192x8192x8192", **env}])

    if args.attention_backends:
        results.add(bench_attention(args, model, device, dtype, env))
    if args.rollout_modes:
        results.add(bench_rollout_modes(args, model, device, env, z0, cond, uncond))

    compiled = False
    baseline_ms = None
    for variant in args.variants:
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"{variant}: skipped, time budget of {args.time_budget:.0f} s spent", flush=True)
            results.add([_row(variant, preset, shape, args, env, "skipped", None, "", note="time budget spent")])
            continue
        try:
            rows, p50 = _run_variant(variant, args, model, device, dtype, z0, cond, uncond, latent, peak_tflops,
                                     compiled, baseline_ms)
        except Exception as err:  # noqa: BLE001 - record the failure, go on with the next variant
            traceback.print_exc()
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            results.add([_row(variant, preset, shape, args, env, "error", None, "", note=msg)])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        finally:
            compiled = compiled or (variant in COMPILED and not args.no_compile)
        if variant == "a":
            baseline_ms = p50
        results.add([_row(variant, preset, shape, args, env, **r) for r in rows])
    return results.rows


COMPILED = ("d", "e", "f", "g", "sft")


def _row(variant, preset, shape, args, env, metric, value, unit, **extra):
    num_aux = 0 if variant.startswith("sft") else args.num_aux
    return {"bench": "soar_step", "provider": variant, "variant_desc": DESCRIPTION.get(variant, variant),
            "model": preset, "shape": shape, "num_aux": num_aux, "dtype": args.dtype, "metric": metric,
            "value": value, "unit": unit, **env, **extra}


def _run_variant(variant, args, model, device, dtype, z0, cond, uncond, latent, peak_tflops, compiled, baseline_ms):
    num_aux = 0 if variant.startswith("sft") else args.num_aux
    config = sf.SoarConfig(num_aux=num_aux)
    if variant in COMPILED and not compiled and not args.no_compile:
        compile_model(model, "per_block", fullgraph=True)
    if variant == "g":
        enable_fp8_training(model)  # every block GEMM (rollout included) now runs in FP8
    rollout_mode = {"e": "cuda_graph", "f": "cuda_graph_fp8", "g": "cuda_graph"}.get(variant, "eager")
    vf = SD3VelocityFn(model)
    engine = RolloutEngine(vf, model, rollout_mode) if variant != "a" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    step_gen = torch.Generator(device=device).manual_seed(1)
    ops_backend = "reference" if variant == "b" else "auto"
    step = _make_step(variant, vf, engine, opt, step_gen, z0, cond, uncond, config, dtype, ops_backend,
                      args.micro_chunks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        for _ in range(args.warmup):
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        times = _time_steps(step, device, 0, args.iters)
    except torch.OutOfMemoryError as err:
        del opt
        return [{"metric": "error", "value": None, "unit": "", "note": f"OOM: {str(err).splitlines()[0][:120]}"}], None
    p20, p50, p80 = _quantiles(times)
    flops = get_family("sd3").step_flops(model, args.batch, num_aux, latent, latent, args.text_len)
    achieved = flops / (p50 * 1e-3) / 1e12
    note = f"rollout={engine.mode}" if engine is not None else "rollout=recorded"
    rows = [
        {"metric": "ms_per_step_p20", "value": p20, "unit": "ms"},
        {"metric": "ms_per_step_p50", "value": p50, "unit": "ms", "note": note, "iters": args.iters},
        {"metric": "ms_per_step_p80", "value": p80, "unit": "ms"},
        {"metric": "samples_per_s", "value": args.batch / (p50 * 1e-3), "unit": "samples/s"},
        {"metric": "tflops", "value": achieved, "unit": "TFLOP/s", "flops_per_step": flops},
        {"metric": "mfu", "value": achieved / peak_tflops, "unit": "fraction", "measured_peak_tflops": peak_tflops},
        {"metric": "warmup_s", "value": warm_s, "unit": "s", "note": f"{args.warmup} steps, compile included"},
    ]
    if device.type == "cuda":
        rows.append({"metric": "peak_memory", "value": torch.cuda.max_memory_allocated(device) / 2**30, "unit": "GiB"})
    if baseline_ms is not None and variant != "a" and num_aux > 0:
        rows.append({"metric": "speedup_vs_a", "value": baseline_ms / p50, "unit": "x", "baseline": "a"})
    if engine is not None and num_aux > 0:  # the rollout alone, in this variant's settings
        draws = sf.sample_draws(z0, config, torch.Generator(device=device).manual_seed(2))
        s0 = draws.sigma0.view(-1, 1, 1, 1)
        z_t = (1 - s0) * z0 + s0 * draws.z1
        ub = broadcast_uncond(uncond, cond, z0.shape[0])
        r_times = _time_steps(lambda: engine(z_t, draws.sigma0, ub, cond), device, 2, max(args.iters, 10))
        r50 = statistics.median(r_times)
        rows.append({"metric": "rollout_ms_p50", "value": r50, "unit": "ms", "note": f"rollout={engine.mode}"})
        if engine.use_fp8:  # the FP8 weight refresh alone (part of every step of this variant)
            f_times = _time_steps(engine.after_optimizer_step, device, 2, max(args.iters, 10))
            rows.append({"metric": "fp8_refresh_ms_p50", "value": statistics.median(f_times), "unit": "ms"})
    del opt
    print(f"{variant:>9} {DESCRIPTION[variant]:<40} {p50:9.2f} ms  {achieved:7.1f} TFLOP/s  "
          f"MFU {achieved / peak_tflops:6.1%}  warm-up {warm_s:5.1f} s  {note}", flush=True)
    return rows, p50


def bench_rollout_modes(args, model, device, env, z0, cond, uncond) -> list[dict]:
    """The CFG rollout alone (one 2B no-grad forward) in each mode, uncompiled, and the cost of
    re-quantising the FP8 weights (once per optimizer step)."""
    from soar_fast.fast.fp8 import refresh_fp8_weights

    config = sf.SoarConfig(num_aux=args.num_aux)
    draws = sf.sample_draws(z0, config, torch.Generator(device=device).manual_seed(2))
    s0 = draws.sigma0.view(-1, 1, 1, 1)
    z_t = (1 - s0) * z0 + s0 * draws.z1
    ub = broadcast_uncond(uncond, cond, z0.shape[0])
    vf = SD3VelocityFn(model)
    rows, eager_ms = [], None
    for mode in args.rollout_modes:
        engine = RolloutEngine(vf, model, mode)
        times = _time_steps(lambda e=engine: e(z_t, draws.sigma0, ub, cond), device, 3, max(args.iters, 10))
        p20, p50, p80 = _quantiles(times)
        eager_ms = p50 if mode == "eager" else eager_ms
        extra = {"speedup_vs_eager": eager_ms / p50} if eager_ms else {}
        rows.append({"bench": "rollout", "provider": mode, "ran": engine.mode, "shape": f"2x{tuple(z_t.shape)}",
                     "dtype": args.dtype, "metric": "ms_p50", "value": p50, "unit": "ms", "p20": p20, "p80": p80,
                     **extra, **env})
        print(f"rollout {mode:<16} (ran {engine.mode:<15}) {p50:9.2f} ms", flush=True)
        if engine.use_fp8:
            t = _time_steps(lambda: refresh_fp8_weights(model), device, 2, max(args.iters, 10))
            rows.append({"bench": "fp8_refresh", "provider": mode, "metric": "ms_p50", "value": statistics.median(t),
                         "unit": "ms", "note": "re-quantise all FP8 rollout weights (once per optimizer step)", **env})
    return rows


def bench_attention(args, model, device, dtype, env) -> list[dict]:
    """Forward+backward of one (1+M)B training batch under each attention backend present."""
    from soar_fast.fast.attention import attention_context

    latent = 8 if args.smoke else args.resolution // 8
    n = args.batch * (1 + args.num_aux)
    mcfg = model.config
    z = torch.randn(n, mcfg.in_channels, latent, latent, device=device, dtype=dtype)
    pe = torch.randn(n, args.text_len, mcfg.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(n, mcfg.pooled_projection_dim, device=device, dtype=dtype)
    sigma = torch.rand(n, device=device)
    vf = SD3VelocityFn(model)
    rows = []
    for backend in args.attention_backends:
        with attention_context(backend) as ran:
            if ran != backend:
                rows.append({"bench": "attention_fwd_bwd", "provider": backend, "metric": "skipped", "value": None,
                             "unit": "", "note": f"fell back to {ran}", **env})
                continue
            fn = lambda: vf(z, sigma, (pe, pooled)).float().square().mean().backward()  # noqa: E731
            times = _time_steps(fn, device, 2, args.iters)
        p20, p50, p80 = _quantiles(times)
        rows.append({"bench": "attention_fwd_bwd", "provider": backend, "shape": f"N{n}x{latent}x{latent}+txt{args.text_len}",
                     "dtype": args.dtype, "metric": "ms_p50", "value": p50, "unit": "ms", "p20": p20, "p80": p80, **env})
        print(f"attention {backend:<16} fwd+bwd {p50:9.2f} ms", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd35-medium")
    p.add_argument("--resolution", type=int, default=512, help="pixels; latents are resolution/8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num_aux", type=int, default=6)
    p.add_argument("--text_len", type=int, default=154)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--micro_chunks", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny config, fp32, few steps (CPU CI)")
    p.add_argument("--attention_backends", default="", help="also time fwd+bwd per attention backend, "
                   "e.g. sdpa,sdpa_flash,sdpa_cudnn,sdpa_efficient,flash_attn")
    p.add_argument("--rollout_modes", default="", help="also time the rollout alone per mode, e.g. "
                   "eager,cuda_graph,fp8,cuda_graph_fp8 (uncompiled; before the variants)")
    p.add_argument("--time_budget", type=float, default=0, help="seconds; variants starting later are skipped")
    p.add_argument("--out", default=None, help="write the JSON rows here (rewritten after each variant)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.smoke:
        args.dtype, args.warmup, args.iters = "fp32", 1, 2
    args.attention_backends = [b for b in args.attention_backends.split(",") if b]
    args.rollout_modes = [m for m in args.rollout_modes.split(",") if m]
    results = Results(args.out)
    run(args, results)
    results.add([])  # writes the file even when nothing ran
    return 0 if not any(r["metric"] == "error" for r in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
