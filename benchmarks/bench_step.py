"""End-to-end SOAR step benchmark: the SD3.5-Medium transformer (real config, random weights),
every variant but (a) built by `soar_fast.train.step.build_train_step` from a `TrainConfig`, so
the step timed is the step `soar-fast train` runs (`bench_train.py` checks that end to end).

Variants, each adding one thing to the one before (b..f) and compared with (a):
  a  baseline mirroring the reference release: rollout with autograd recording, the M auxiliary
     passes one by one, targets in the compute dtype, plain module, torch AdamW, bf16 autocast
  b  our eager batched step: one (1+M)B pass, no-grad rollout, fp32 targets (reference ops)
  c  + fused kernels (ops backend auto: native or Triton on CUDA)
  d  + torch.compile per transformer block
  e  + CUDA-graph rollout (on the rollout's own replica of the weights, refreshed every step)
  f  + FP8 rollout (a CUDA graph of the FP8 rollout; torch._scaled_mm)
  g  + FP8 for the training GEMMs (our torch._scaled_mm linear: e4m3 forward, e5m2 grads); the
     rollout stays the bf16 CUDA graph of (e)
  sft the SFT step (M = 0) with the settings of d (sft_eager: of c), for the SOAR/SFT ratio
A variant may carry a precision, `e:pure_bf16` (see step_lib.py); `--precision` sets the rest
(default `trainer`: fp32 master weights and AdamW states, bf16 compute, fp32 gradient reduction).
Each row records the resolved configuration (`config`: ops backend, rollout mode as it ran,
compile, precision, FP8, world size). Reported per variant: ms/step (p20/p50/p80), samples/s,
peak memory, MFU against the bf16 GEMM rate measured in the same run, speedup over (a) of the
same precision, warm-up (compile included), the rollout alone and the rollout refresh.
`--rollout_modes` times the rollout per engine mode (uncompiled) and the FP8 weight refresh;
`--attention_backends` the forward+backward per attention backend. A failing variant is an
error row and the run goes on; the JSON is rewritten after every variant.

  python benchmarks/bench_step.py --out results.json                 # GPU, SD3.5-M, 512 px
  python benchmarks/bench_step.py --smoke --out smoke.json           # CPU, tiny config, fp32
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_lib as lib  # noqa: E402

import soar_fast as sf  # noqa: E402
from soar_fast.distributed import init_distributed  # noqa: E402
from soar_fast.fast import RolloutEngine  # noqa: E402
from soar_fast.loss.cond import broadcast_uncond, cat_cond  # noqa: E402
from soar_fast.models.spec import get_family  # noqa: E402
from soar_fast.train.build import build_model  # noqa: E402
from soar_fast.train.step import build_train_step, precision_dtypes  # noqa: E402

VARIANTS = tuple(lib.VARIANTS)  # cheapest first: a timeout keeps the most


def release_style_step(vf, z0, cond, uncond, config, draws, dtype):
    """SOAR as the reference release structures it: rollout with autograd recording, M separate
    auxiliary passes, targets in the model dtype. Same math; the baseline of the benchmark."""
    b, m, g = z0.shape[0], config.num_aux, config.guidance_scale
    view = lambda s: s.to(dtype).view(-1, *([1] * (z0.dim() - 1)))  # noqa: E731  (images and video)
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


def shape_of(args) -> lib.Shape:
    return lib.Shape(family=args.family, preset=args.preset, batch=args.batch, num_aux=args.num_aux, latent=args.latent,
                     text_len=args.text_len, micro_chunks=args.micro_chunks, frames=args.frames,
                     lora_rank=args.lora_rank, activation_checkpointing=args.activation_checkpointing)


class Bench:
    """One run: the shape, the measured peak, the inputs, the rows."""

    def __init__(self, args, results: lib.Results):
        self.args, self.results = args, results
        self.device = torch.device(args.device)
        self.family = get_family(args.family)
        self.shape = shape_of(args)
        self.env = init_distributed(None, self.device)
        self.info = lib.env_info(self.device)
        self.peak = lib.measure_bf16_gemm_tflops(self.device)
        self.fp8_peak = lib.measure_fp8_gemm_tflops(self.device)
        probe = lib.variant_config("c", args.precision, self.shape, args.device)
        self.z0, self.cond, self.uncond = lib.step_inputs(probe, self.device)
        self.shape_str = f"B{args.batch}x{tuple(self.z0.shape[1:])}+txt{args.text_len}"
        self.baseline_ms: dict[str, float] = {}

    def row(self, spec, name, precision, metric, value, unit, **extra):
        num_aux = self.shape.num_aux if lib.VARIANTS[name][2] else 0
        return {"bench": "soar_step", "provider": spec, "variant": name, "variant_desc": lib.VARIANTS[name][0],
                "model": f"{self.args.family}/{self.args.preset}", "shape": self.shape_str, "num_aux": num_aux,
                "lora_rank": self.args.lora_rank, "activation_checkpointing": self.args.activation_checkpointing,
                "precision": precision, "dtype": "fp32" if precision == "fp32" else "bf16", "metric": metric,
                "value": value, "unit": unit, **self.info, **extra}

    # --- one variant --------------------------------------------------------------------------
    def measure(self, spec: str) -> list[dict]:
        a = self.args
        name, precision = lib.parse_variant(spec, a.precision)
        cfg = lib.variant_config(name, precision, self.shape, a.device, compile_off=a.no_compile)
        lib.free_memory(self.device)
        model = build_model(cfg.model, device=self.device)[1]  # the trainer's model (LoRA included)
        flops = self.family.step_flops(model, a.batch, cfg.soar.num_points, a.latent, a.latent, a.text_len,
                                       frames=max(1, a.frames))
        if name == "a":
            fn, step, config = self._release_step(model, cfg), None, self._release_config(cfg, precision)
        else:
            step = build_train_step(self.family, model, cfg, self.env)
            counter = itertools.count()
            batches = [(self.z0, self.cond, list(range(a.batch)))]
            fn = lambda: step(next(counter), batches, self.uncond)  # noqa: E731
            config = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            lib.time_steps(fn, self.device, a.warmup, 0)
            warm_s = time.perf_counter() - t0
            times = lib.time_steps(fn, self.device, 0, a.iters)
        except torch.OutOfMemoryError as err:
            return [self.row(spec, name, precision, "error", None, "", note=f"OOM: {str(err).splitlines()[0][:120]}")]
        if step is not None:
            config = {**step.describe(), "precision": precision}
        p20, p50, p80 = lib.quantiles(times)
        achieved = flops / (p50 * 1e-3) / 1e12
        r = lambda metric, value, unit, **x: self.row(spec, name, precision, metric, value, unit, config=config, **x)  # noqa: E731
        rows = [r("ms_per_step_p20", p20, "ms"), r("ms_per_step_p50", p50, "ms", iters=a.iters),
                r("ms_per_step_p80", p80, "ms"), r("samples_per_s", a.batch / (p50 * 1e-3), "samples/s"),
                r("tflops", achieved, "TFLOP/s", flops_per_step=flops),
                r("mfu", achieved / self.peak, "fraction", measured_peak_tflops=self.peak),
                *([r("mfu_fp8", achieved / self.fp8_peak, "fraction", measured_fp8_peak_tflops=self.fp8_peak)]
                  if name in lib.FP8_VARIANTS and self.fp8_peak else []),
                r("warmup_s", warm_s, "s", note=f"{a.warmup} steps, compile included")]
        if self.device.type == "cuda":
            rows.append(r("peak_memory", torch.cuda.max_memory_allocated(self.device) / 2**30, "GiB"))
        if name == "a":
            self.baseline_ms[precision] = p50
        elif self.baseline_ms and cfg.soar.num_aux > 0:  # (a) of the same precision, else the first (a) timed
            base = precision if precision in self.baseline_ms else next(iter(self.baseline_ms))
            rows.append(r("speedup_vs_a", self.baseline_ms[base] / p50, "x", baseline=f"a:{base}"))
        if step is not None and step.rollout is not None and cfg.soar.num_aux > 0:
            rows += self._rollout_rows(step, cfg, r)
        if a.profile and spec in a.profile_variants:
            breakdown, wall = lib.profile_steps(fn, self.device, a.profile)
            rows += [r("profile_ms", ms, "ms", category=cat, share=ms / wall, profiled_steps=a.profile,
                       profiled_wall_ms=wall) for cat, ms in breakdown.items()]
            print(f"{'':>12} profile ({a.profile} steps, {wall:.2f} ms/step): "
                  + ", ".join(f"{cat} {ms / wall:.0%}" for cat, ms in breakdown.items()), flush=True)
        print(f"{spec:>12} {lib.VARIANTS[name][0]:<42} {p50:9.2f} ms  {achieved:7.1f} TFLOP/s  "
              f"MFU {achieved / self.peak:6.1%}  warm-up {warm_s:5.1f} s  rollout={config['rollout']}", flush=True)
        return rows

    def _release_config(self, cfg, precision) -> dict:
        weight, compute, _ = precision_dtypes(cfg)
        return {"step": "release_structure", "ops_backend": "none", "rollout": "recorded", "compile": "none",
                "precision": precision, "weight_dtype": str(weight).removeprefix("torch."),
                "compute_dtype": str(compute).removeprefix("torch."), "world_size": 1}

    def _release_step(self, model, cfg):
        """(a): plain module in the policy's weight dtype, bf16 autocast when compute differs (as
        accelerate's mixed precision does), diffusers' gradient checkpointing when the shape asks for
        activation checkpointing, torch AdamW, clipping."""
        weight, compute, _ = precision_dtypes(cfg)
        model = model.to(dtype=weight).train()
        if cfg.fast.activation_checkpointing:  # as a diffusers trainer does it (--gradient_checkpointing)
            model.enable_gradient_checkpointing()
        vf = self.family.velocity(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.optim.learning_rate)
        gen = torch.Generator(device=self.device).manual_seed(1)
        autocast = (torch.autocast(self.device.type, dtype=compute) if compute != weight
                    else contextlib.nullcontext())

        def fn():
            draws = sf.sample_draws(self.z0, cfg.soar, gen)
            opt.zero_grad(set_to_none=True)
            with autocast:
                release_style_step(vf, self.z0, self.cond, self.uncond, cfg.soar, draws, compute)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            opt.step()

        return fn

    def _rollout_rows(self, step, cfg, r) -> list[dict]:
        """The rollout alone and its refresh after an optimizer step, in this variant's settings."""
        n = max(self.args.iters, 10)
        draws = sf.sample_draws(self.z0, cfg.soar, torch.Generator(device=self.device).manual_seed(2))
        s0 = draws.sigma0.view(-1, *([1] * (self.z0.dim() - 1)))
        z_t = (1 - s0) * self.z0 + s0 * draws.z1
        ub = broadcast_uncond(self.uncond, self.cond, self.z0.shape[0])
        mode = step.rollout.mode
        with torch.no_grad():
            r50 = statistics.median(lib.time_steps(lambda: step.rollout(z_t, draws.sigma0, ub, self.cond),
                                                   self.device, 2, n))
            f50 = statistics.median(lib.time_steps(step.refresh_rollout, self.device, 2, n))
        return [r("rollout_ms_p50", r50, "ms", note=f"rollout={mode}"),
                r("rollout_refresh_ms_p50", f50, "ms", note="replica copy + FP8 re-quantisation, once per step")]

    # --- the rollout per engine mode, attention per backend -------------------------------------
    def plain_model(self):
        cfg = lib.variant_config("c", self.args.precision, self.shape, self.args.device)
        compute = precision_dtypes(cfg)[1]
        return self.family.build(self.args.preset, seed=0, device=self.device).to(dtype=compute)

    def rollout_modes(self) -> list[dict]:
        """The CFG rollout alone (one 2B no-grad forward) in each mode, uncompiled, and the cost of
        re-quantising the FP8 weights (once per optimizer step)."""
        from soar_fast.fast.fp8 import refresh_fp8_weights

        a, model = self.args, self.plain_model()
        draws = sf.sample_draws(self.z0, sf.SoarConfig(num_aux=a.num_aux), torch.Generator(device=self.device).manual_seed(2))
        s0 = draws.sigma0.view(-1, *([1] * (self.z0.dim() - 1)))
        z_t = (1 - s0) * self.z0 + s0 * draws.z1
        ub = broadcast_uncond(self.uncond, self.cond, self.z0.shape[0])
        rows, eager_ms = [], None
        for mode in a.rollout_modes:
            engine = RolloutEngine(self.family.velocity(model), model, mode)
            with torch.no_grad():
                times = lib.time_steps(lambda e=engine: e(z_t, draws.sigma0, ub, self.cond), self.device, 3, max(a.iters, 10))
            p20, p50, p80 = lib.quantiles(times)
            eager_ms = p50 if mode == "eager" else eager_ms
            extra = {"speedup_vs_eager": eager_ms / p50} if eager_ms else {}
            rows.append({"bench": "rollout", "provider": mode, "ran": engine.mode, "shape": f"2x{tuple(z_t.shape)}",
                         "dtype": "bf16", "metric": "ms_p50", "value": p50, "unit": "ms", "p20": p20, "p80": p80,
                         **extra, **self.info})
            print(f"rollout {mode:<16} (ran {engine.mode:<15}) {p50:9.2f} ms", flush=True)
            if engine.use_fp8:
                t = lib.time_steps(lambda: refresh_fp8_weights(model), self.device, 2, max(a.iters, 10))
                rows.append({"bench": "fp8_refresh", "provider": mode, "metric": "ms_p50", "value": statistics.median(t),
                             "unit": "ms", "note": "re-quantise all FP8 rollout weights (once per optimizer step)",
                             **self.info})
        return rows

    def attention(self) -> list[dict]:
        """Forward+backward of one (1+M)B training batch under each attention backend present."""
        from soar_fast.fast.attention import attention_context

        a, model = self.args, self.plain_model()
        n = a.batch * (1 + a.num_aux)
        dtype = next(model.parameters()).dtype
        z = self.z0.to(dtype).repeat(1 + a.num_aux, *([1] * (self.z0.dim() - 1)))
        cond = tuple(t.to(dtype).repeat(1 + a.num_aux, *([1] * (t.dim() - 1))) for t in self.cond)
        sigma = torch.rand(n, device=self.device)
        vf = self.family.velocity(model)
        rows = []
        for backend in a.attention_backends:
            with attention_context(backend) as ran:
                if ran != backend:
                    rows.append({"bench": "attention_fwd_bwd", "provider": backend, "metric": "skipped", "value": None,
                                 "unit": "", "note": f"fell back to {ran}", **self.info})
                    continue
                fn = lambda: vf(z, sigma, cond).float().square().mean().backward()  # noqa: E731
                times = lib.time_steps(fn, self.device, 2, a.iters)
            p20, p50, p80 = lib.quantiles(times)
            rows.append({"bench": "attention_fwd_bwd", "provider": backend, "shape": f"N{n}x{tuple(z.shape[1:])}",
                         "dtype": str(dtype).removeprefix("torch."), "metric": "ms_p50", "value": p50, "unit": "ms",
                         "p20": p20, "p80": p80, **self.info})
            print(f"attention {backend:<16} fwd+bwd {p50:9.2f} ms", flush=True)
        return rows


def run(args, results: lib.Results | None = None) -> list[dict]:
    results = results or lib.Results(None)
    bench = Bench(args, results)
    print(f"{args.family}/{args.preset} {bench.shape_str} M={args.num_aux} precision={args.precision} on "
          f"{bench.info['device']}; bf16 GEMM {bench.peak:.0f} TFLOP/s", flush=True)
    results.add([{"bench": "bf16_gemm_8192", "provider": "torch", "metric": "tflops", "value": bench.peak,
                  "unit": "TFLOP/s", "dtype": "bf16", "shape": "8192x8192x8192", **bench.info}])
    if bench.fp8_peak:
        results.add([{"bench": "fp8_gemm_8192", "provider": "torch._scaled_mm", "metric": "tflops",
                      "value": bench.fp8_peak, "unit": "TFLOP/s", "dtype": "float8_e4m3fn",
                      "shape": "8192x8192x8192" if bench.device.type == "cuda" else "512x512x512", **bench.info}])
    if args.attention_backends:
        results.add(bench.attention())
    if args.rollout_modes:
        results.add(bench.rollout_modes())
    t_start = time.perf_counter()
    for spec in args.variants:
        name, precision = lib.parse_variant(spec, args.precision)
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"{spec}: skipped, time budget of {args.time_budget:.0f} s spent", flush=True)
            results.add([bench.row(spec, name, precision, "skipped", None, "", note="time budget spent")])
            continue
        try:
            results.add(bench.measure(spec))
        except Exception as err:  # noqa: BLE001 - record the failure, go on with the next variant
            traceback.print_exc()
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            results.add([bench.row(spec, name, precision, "error", None, "", note=msg)])
    lib.free_memory(bench.device)
    return results.rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="sd3")
    p.add_argument("--preset", default="sd35-medium")
    p.add_argument("--resolution", type=int, default=512, help="pixels; latents are resolution/8")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num_aux", type=int, default=6)
    p.add_argument("--text_len", type=int, default=154)
    p.add_argument("--precision", default=None, choices=list(lib.PRECISIONS),
                   help="policy of variants without ':precision' (default trainer; fp32 with --smoke)")
    p.add_argument("--micro_chunks", type=int, default=1)
    p.add_argument("--frames", type=int, default=0, help="latent frames of a video family (Wan; 9 = 33 frames); "
                   "0 = images")
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA adapters of this rank (the family's targets); 0 = full")
    p.add_argument("--activation_checkpointing", action="store_true", help="FastConfig.activation_checkpointing")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of name[:precision]")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no_compile", action="store_true", help="run every variant uncompiled (rows say so)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny config, fp32, few steps (CPU CI)")
    p.add_argument("--attention_backends", default="", help="also time fwd+bwd per attention backend, "
                   "e.g. sdpa,sdpa_flash,sdpa_cudnn,sdpa_efficient,flash_attn")
    p.add_argument("--rollout_modes", default="", help="also time the rollout alone per mode, e.g. "
                   "eager,cuda_graph,fp8,cuda_graph_fp8 (uncompiled; before the variants)")
    p.add_argument("--profile", type=int, default=0, help="also profile this many steps of the --profile_variants "
                   "(torch.profiler): a profile_ms row per category (GEMM, attention, elementwise, optimizer, "
                   "rollout, SOAR ops, idle) with its share of the step")
    p.add_argument("--profile_variants", default="e,g,g_ao", help="comma list of the variant specs to profile")
    p.add_argument("--time_budget", type=float, default=0, help="seconds; variants starting later are skipped")
    p.add_argument("--out", default=None, help="write the JSON rows here (rewritten after each variant)")
    p.add_argument("--plan_only", action="store_true", help="no step runs: one predicted_peak_gib row per variant "
                   "from soar_fast.train.plan (a CPU is enough)")
    p.add_argument("--plan_harness", default="trainer", choices=list(lib.PLAN_HARNESSES),
                   help="--plan_only: the step as built today, or as the 2026-11-26 H200 rows ran (plain module)")
    return p


def parse_args(argv=None, p: argparse.ArgumentParser | None = None):
    p = p or parser()
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.profile_variants = [v for v in args.profile_variants.split(",") if v]
    for spec in args.variants:
        try:
            lib.parse_variant(spec, "trainer")
        except ValueError as e:
            p.error(str(e))
    args.latent = args.resolution // 8
    if args.smoke:
        args.preset, args.latent, args.text_len = "tiny", 8, 7
        args.warmup, args.iters = 1, 2
    args.precision = args.precision or ("fp32" if args.smoke else "trainer")
    args.attention_backends = [b for b in args.attention_backends.split(",") if b]
    args.rollout_modes = [m for m in args.rollout_modes.split(",") if m]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = lib.Results(args.out)
    if args.plan_only:  # the planner's prediction per variant, keyed like the measured rows
        rows = lib.plan_rows(args.variants, args.precision, shape_of(args), lib.env_info(torch.device("cpu")), args.plan_harness)
        for r in rows:
            print(f"{r['provider']:>12} {r['variant_desc']:<42} predicted peak {r['value']:7.2f} GiB ({r['phase']})")
        results.add(rows)
        return 0
    run(args, results)
    results.add([])  # writes the file even when nothing ran
    return 0 if not any(r["metric"] == "error" for r in results.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
