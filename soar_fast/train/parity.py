"""Parity harness: one SOAR step (same weights, same draws) through every step variant that
`build_train_step` builds, compared with the eager reference on a plain module.
`soar-fast parity` / `python -m soar_fast.train.parity`.

Each variant is a `TrainConfig` override, so what is compared is exactly what trains. Rows: loss
relative error and per-parameter gradient cosine (worst) and max relative error (fp32: the
README's <= 1e-5), and for the rollout variants the v_cfg relative error or the graph-vs-eager
difference. A variant this machine cannot run (CUDA graphs without a GPU) is reported as
skipped, never as ok. Each row names the ops backend, rollout mode, compile mode, precision and
world size that ran. The process exits non-zero when a row fails.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass

import torch

import soar_fast as sf
from soar_fast.config import ConfigError, TrainConfig
from soar_fast.distributed import init_distributed, unwrap_name
from soar_fast.loss.cond import broadcast_uncond, cat_cond
from soar_fast.models.spec import get_family
from soar_fast.train.step import build_train_step

__all__ = ["VARIANTS", "ParityRow", "main", "run_parity"]

# variant -> (runtime.step, fast overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "eager_step": ("eager", {}),
    "batched": ("fast", {}),
    "batched_chunked": ("fast", {"micro_chunks": 2}),
    "checkpointed": ("fast", {"activation_checkpointing": True}),
    "compiled": ("fast", {"compile": "per_block"}),
    "graphed_rollout": ("fast", {"rollout": "cuda_graph"}),
    "fp8_rollout": ("fast", {"rollout": "fp8"}),
}
TOL = {"loss_rel": 1e-5, "grad_cos": 0.99999, "grad_max_rel": 1e-5, "vcfg_rel": 3e-2, "graph_vs_eager_max_abs": 0.0}


@dataclass
class ParityRow:
    variant: str
    metric: str
    value: float | None
    tolerance: float | None
    status: str  # "ok" | "FAIL" | "skipped"
    note: str = ""
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[unwrap_name(name)] = torch.zeros(p.shape) if g is None else g.detach().float().cpu().clone()
    return out


def _compare(variant, loss, grads, ref_loss, ref_grads, config) -> list[ParityRow]:
    rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    cos, mrel = 1.0, 0.0
    for name, r in ref_grads.items():
        g = grads[name]
        if r.abs().max() == 0 and g.abs().max() == 0:
            continue
        cos = min(cos, torch.nn.functional.cosine_similarity(g.flatten().double(), r.flatten().double(), dim=0).item())
        mrel = max(mrel, ((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item())
    row = lambda metric, v, ok: ParityRow(variant, metric, v, TOL[metric], "ok" if ok else "FAIL", config=config)  # noqa: E731
    return [row("loss_rel", rel, rel <= TOL["loss_rel"]), row("grad_cos", cos, cos >= TOL["grad_cos"]),
            row("grad_max_rel", mrel, mrel <= TOL["grad_max_rel"])]


def _train_config(step: str, fast: dict, soar: sf.SoarConfig, device: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.runtime = dataclasses.replace(cfg.runtime, step=step, device=device)
    cfg.fast = dataclasses.replace(cfg.fast, **fast)
    cfg.soar = soar
    return cfg


def run_parity(preset: str = "tiny", batch: int = 2, num_aux: int = 3, size: int = 8, seq: int = 5, seed: int = 0,
               variants: tuple[str, ...] = tuple(VARIANTS), device: str = "cpu", family: str = "sd3",
               fp8_scaling: str = "tensorwise", soar: dict | None = None) -> list[ParityRow]:
    """The parity table on a randomly initialised `preset` (fp32; on CUDA with TF32 off, so the
    tolerances measure our code, not cuBLAS's reduced-precision mode)."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"unknown parity variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        soar_cfg = sf.SoarConfig(num_aux=num_aux, **(soar or {}))
        return _run(get_family(family), preset, batch, soar_cfg, size, seq, seed, variants, device, fp8_scaling)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _run(family, preset, batch, soar, size, seq, seed, variants, device, fp8_scaling) -> list[ParityRow]:
    dev = torch.device(device)
    base = family.build(preset, seed=seed)
    mc = base.config
    g = torch.Generator().manual_seed(seed)
    frames = (2,) if getattr(family.velocity, "latent_ndim", 4) == 5 else ()  # video families: [B, C, 2, S, S]
    z0 = torch.randn(batch, family.latent_channels(mc), *frames, size, size, generator=g).to(dev)
    text_dim, pooled_dim = family.text_dims(mc)
    cond = (torch.randn(batch, seq, text_dim, generator=g).to(dev), torch.randn(batch, pooled_dim, generator=g).to(dev))
    uncond = (torch.zeros(seq, text_dim, device=dev), torch.zeros(pooled_dim, device=dev))
    draws = sf.sample_draws(z0, soar, torch.Generator(device=dev).manual_seed(seed + 1))

    ref_model = copy.deepcopy(base).to(dev)
    ref_rollout = family.rollout_velocity(ref_model, soar)  # None: true CFG; else the distilled rollout
    ref = sf.soar_loss_from_draws(family.velocity(ref_model), z0, cond, uncond, soar, draws, rollout_fn=ref_rollout)
    ref.loss.backward()
    ref_loss, ref_grads = ref.loss.item(), _grads(ref_model)
    s0 = draws.sigma0.view(-1, *([1] * (z0.dim() - 1)))
    z_t = (1 - s0) * z0 + s0 * draws.z1
    ub = broadcast_uncond(uncond, cond, batch)
    with torch.no_grad():
        if ref_rollout is not None:
            ref_u = ref_c = ref_rollout(z_t, draws.sigma0, cond)
        else:
            ref_u, ref_c = family.velocity(ref_model)(torch.cat([z_t, z_t]), torch.cat([draws.sigma0] * 2),
                                                       cat_cond(ub, cond)).chunk(2)
    ref_cfg = ref_u + soar.guidance_scale * (ref_c - ref_u)

    rows: list[ParityRow] = []
    for variant in variants:
        step_kind, fast = VARIANTS[variant]
        if variant == "graphed_rollout" and dev.type != "cuda":
            rows.append(ParityRow(variant, "graph_vs_eager_max_abs", None, 0.0, "skipped", "needs CUDA"))
            continue
        cfg = _train_config(step_kind, {**fast, "fp8_scaling": fp8_scaling}, soar, device)
        env = init_distributed(cfg.parallel, device)
        step = build_train_step(family, copy.deepcopy(base), cfg, env)
        config = step.describe()
        if variant in ("graphed_rollout", "fp8_rollout"):
            v_u, v_c = step.rollout(z_t, draws.sigma0, ub, cond)
            v_u, v_c = v_u.clone(), v_c.clone()
            if variant == "graphed_rollout":
                again = [t.clone() for t in step.rollout(z_t, draws.sigma0, ub, cond)]  # a replay
                diff = max((a - b).abs().max().item() for a, b in zip(again, (v_u, v_c)))
                ok = step.rollout.mode == "cuda_graph" and diff <= TOL["graph_vs_eager_max_abs"]
                rows.append(ParityRow(variant, "graph_vs_eager_max_abs", diff, 0.0, "ok" if ok else "FAIL",
                                      f"replay vs capture, mode={step.rollout.mode}", config))
                eager_cfg = ref_cfg  # the captured rollout against the reference rollout too
            else:
                eager_cfg = ref_cfg
            got = v_u + soar.guidance_scale * (v_c - v_u)
            rel = ((got - eager_cfg).norm() / eager_cfg.norm()).item()
            tol = TOL["vcfg_rel"] if variant == "fp8_rollout" else 1e-5
            how = "" if variant != "fp8_rollout" else (
                "torch._scaled_mm" if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)
                else "emulated") + f", {fp8_scaling}"
            rows.append(ParityRow(variant, "vcfg_rel", rel, tol, "ok" if rel <= tol else "FAIL", how, config))
            continue
        out = step.micro_step(z0, cond, uncond, draws)
        rows += _compare(variant, out.loss.item(), _grads(step.model), ref_loss, ref_grads, config)
    return rows


def format_table(rows: list[ParityRow]) -> str:
    lines = [f"{'variant':<18} {'metric':<24} {'value':>12} {'tolerance':>10}  result", "-" * 76]
    for r in rows:
        val = "-" if r.value is None else f"{r.value:.3e}"
        tol = "-" if r.tolerance is None else f"{r.tolerance:.0e}"
        where = f" [ops {r.config['ops_backend']}, rollout {r.config['rollout']} {r.config.get('rollout_guidance', 'cfg')}, world {r.config['world_size']}]" \
            if r.config else ""
        lines.append(f"{r.variant:<18} {r.metric:<24} {val:>12} {tol:>10}  {r.status} {r.note}{where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soar-fast parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="sd3", help="model family (sd3, flux, flux2, qwenimage, zimage)")
    p.add_argument("--preset", default="tiny", help="architecture preset of the family (random weights)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num_aux", type=int, default=3)
    p.add_argument("--num_rollout_paths", type=int, default=1, help="stochastic rollout paths (SoarConfig)")
    p.add_argument("--sde_rollout_type", default="flow_sde", choices=["simple", "sde", "flow_sde", "cps"])
    p.add_argument("--rollout_steps", type=int, default=40, help="N of the rollout step (u1 = u0 - 1/N)")
    p.add_argument("--aux_timestep", default="sigma", choices=["sigma", "table"])
    p.add_argument("--rollout_guidance", default="auto", choices=["auto", "cfg", "distilled"],
                   help="true CFG or the distilled guidance embedding (auto: distilled where the model has one)")
    p.add_argument("--size", type=int, default=8, help="latent height and width")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp8_scaling", default="tensorwise", choices=["tensorwise", "rowwise"])
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    a = p.parse_args(argv)
    variants = tuple(v for v in a.variants.split(",") if v)
    soar = {"num_rollout_paths": a.num_rollout_paths, "sde_rollout_type": a.sde_rollout_type,
            "rollout_steps": a.rollout_steps, "aux_timestep": a.aux_timestep, "rollout_guidance": a.rollout_guidance}
    rows = run_parity(a.preset, a.batch, a.num_aux, a.size, variants=variants, device=a.device, family=a.family,
                      fp8_scaling=a.fp8_scaling, soar=soar)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "FAIL", "skipped")}
    print(f"parity: {counts['ok']} ok, {counts['FAIL']} failed, {counts['skipped']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
