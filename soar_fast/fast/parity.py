"""Parity harness: the same SOAR step (same weights, same draws) through every fast variant,
compared with the eager reference. `soar-fast parity` / `python -m soar_fast.fast.parity`.

Rows: loss relative error, per-parameter gradient cosine (worst) and max relative error, and for
the rollout variants the v_cfg relative error against the eager rollout. Each metric has a
tolerance; the process exits non-zero when one fails. Variants that cannot run here (CUDA graph
and real FP8 GEMMs without a GPU) are reported as skipped; FP8 numerics are emulated on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass

import torch

import soar_fast as sf
from soar_fast.fast.compile import compile_model
from soar_fast.fast.rollout import RolloutEngine
from soar_fast.fast.step import batched_soar_step
from soar_fast.loss.cond import broadcast_uncond
from soar_fast.models import SD3VelocityFn, build_sd3_transformer

__all__ = ["ParityRow", "main", "run_parity"]

VARIANTS = ("batched", "batched_chunked", "compiled", "graphed_rollout", "fp8_rollout")
TOL = {"loss_rel": 1e-5, "grad_cos": 0.9999, "grad_max_rel": 1e-3, "vcfg_rel": 3e-2, "graph_vs_eager_max_abs": 0.0}


@dataclass
class ParityRow:
    variant: str
    metric: str
    value: float | None
    tolerance: float | None
    ok: bool
    note: str = ""


def _compare(variant: str, loss: float, grads: list[torch.Tensor], ref_loss: float, ref_grads: list[torch.Tensor]):
    rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    cos, mrel = 1.0, 0.0
    for g, r in zip(grads, ref_grads):
        if r.abs().max() == 0 and g.abs().max() == 0:
            continue
        cos = min(cos, torch.nn.functional.cosine_similarity(g.flatten().double(), r.flatten().double(), dim=0).item())
        mrel = max(mrel, ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item())
    return [
        ParityRow(variant, "loss_rel", rel, TOL["loss_rel"], rel <= TOL["loss_rel"]),
        ParityRow(variant, "grad_cos_min", cos, TOL["grad_cos"], cos >= TOL["grad_cos"]),
        ParityRow(variant, "grad_max_rel", mrel, TOL["grad_max_rel"], mrel <= TOL["grad_max_rel"]),
    ]


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def run_parity(
    preset: str = "tiny",
    batch: int = 2,
    num_aux: int = 3,
    size: int = 8,
    seq: int = 5,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
    device: str = "cpu",
    fp8_scaling: str = "tensorwise",
) -> list[ParityRow]:
    """Run the parity table on a randomly initialised `preset` model (fp32; on CUDA with TF32
    off, so the tolerances measure our code, not cuBLAS's reduced-precision mode)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _run_parity(preset, batch, num_aux, size, seq, seed, variants, torch.device(device), fp8_scaling)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run_parity(preset, batch, num_aux, size, seq, seed, variants, dev, fp8_scaling) -> list[ParityRow]:
    base_model = build_sd3_transformer(preset, seed=seed, device=dev)
    cfg_m = base_model.config
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, cfg_m.in_channels, size, size, generator=g).to(dev)
    cond = (torch.randn(batch, seq, cfg_m.joint_attention_dim, generator=g).to(dev),
            torch.randn(batch, cfg_m.pooled_projection_dim, generator=g).to(dev))
    uncond = (torch.zeros(seq, cfg_m.joint_attention_dim, device=dev), torch.zeros(cfg_m.pooled_projection_dim, device=dev))
    config = sf.SoarConfig(num_aux=num_aux)
    draws = sf.sample_draws(z0, config, torch.Generator(device=dev).manual_seed(seed + 1))

    ref_model = copy.deepcopy(base_model)
    ref = sf.soar_loss_from_draws(SD3VelocityFn(ref_model), z0, cond, uncond, config, draws)
    ref.loss.backward()
    ref_loss, ref_grads = ref.loss.item(), _grads(ref_model)

    rows: list[ParityRow] = []
    s0 = draws.sigma0.view(-1, 1, 1, 1)
    z_t = (1 - s0) * z0 + s0 * draws.z1
    uncond_b = broadcast_uncond(uncond, cond, batch)
    for variant in variants:
        model = copy.deepcopy(base_model)
        vf = SD3VelocityFn(model)
        if variant in ("batched", "batched_chunked"):
            out = batched_soar_step(vf, z0, cond, uncond, config, draws, micro_chunks=1 if variant == "batched" else 2)
            rows += _compare(variant, out.loss.item(), _grads(model), ref_loss, ref_grads)
        elif variant == "compiled":
            compile_model(model, "per_block", fullgraph=True)
            out = batched_soar_step(vf, z0, cond, uncond, config, draws)
            rows += _compare(variant, out.loss.item(), _grads(model), ref_loss, ref_grads)
        elif variant == "graphed_rollout":
            if dev.type != "cuda":
                rows.append(ParityRow(variant, "graph_vs_eager_max_abs", None, 0.0, True, "skipped: needs CUDA"))
                continue
            eager = RolloutEngine(vf, model, "eager")(z_t, draws.sigma0, uncond_b, cond)
            engine = RolloutEngine(vf, model, "cuda_graph")
            graphed = [t.clone() for t in engine(z_t, draws.sigma0, uncond_b, cond)]
            graphed = [t.clone() for t in engine(z_t, draws.sigma0, uncond_b, cond)]  # a replay
            diff = max((a - b).abs().max().item() for a, b in zip(graphed, eager))
            ok = engine.mode == "cuda_graph" and diff <= TOL["graph_vs_eager_max_abs"]
            rows.append(ParityRow(variant, "graph_vs_eager_max_abs", diff, 0.0, ok, f"mode={engine.mode}"))
        elif variant == "fp8_rollout":
            eager_u, eager_c = RolloutEngine(vf, model, "eager")(z_t, draws.sigma0, uncond_b, cond)
            engine = RolloutEngine(vf, model, "fp8", fp8_rowwise=fp8_scaling == "rowwise")
            v_u, v_c = engine(z_t, draws.sigma0, uncond_b, cond)
            gs = config.guidance_scale
            ref_cfg, fp8_cfg = eager_u + gs * (eager_c - eager_u), v_u + gs * (v_c - v_u)
            rel = ((fp8_cfg - ref_cfg).norm() / ref_cfg.norm()).item()
            how = "torch._scaled_mm" if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9) else "emulated"
            rows.append(ParityRow(variant, "vcfg_rel", rel, TOL["vcfg_rel"], rel <= TOL["vcfg_rel"], f"{how}, {fp8_scaling}"))
        else:
            raise ValueError(f"unknown parity variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return rows


def format_table(rows: list[ParityRow]) -> str:
    lines = [f"{'variant':<18} {'metric':<24} {'value':>12} {'tolerance':>10}  result",
             "-" * 76]
    for r in rows:
        val = "-" if r.value is None else f"{r.value:.3e}"
        tol = "-" if r.tolerance is None else f"{r.tolerance:.0e}"
        res = "ok" if r.ok else "FAIL"
        lines.append(f"{r.variant:<18} {r.metric:<24} {val:>12} {tol:>10}  {res} {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soar-fast parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="SD3 architecture preset (random weights)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num_aux", type=int, default=3)
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp8_scaling", default="tensorwise", choices=["tensorwise", "rowwise"])
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    a = p.parse_args(argv)
    variants = tuple(v for v in a.variants.split(",") if v)
    rows = run_parity(a.preset, a.batch, a.num_aux, a.size, variants=variants, device=a.device, fp8_scaling=a.fp8_scaling)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    failed = [r for r in rows if not r.ok]
    print(f"parity: {len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
