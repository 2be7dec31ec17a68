"""A small distributed SOAR training loop: the harness of the tests and the template of the trainer.

    torchrun --standalone --nproc_per_node 2 -m soar_fast.distributed.run --out runs/dist --steps 20

Tiny SD3 transformer, a synthetic dataset of random latents and conditions (a pure function of
(seed, index)), AdamW, the global SOAR loss, DCP checkpoints every K steps and resume from the
latest one. Rank 0 appends one JSON row per step to <out>/losses.jsonl. Without torchrun it runs
as a plain single process (no FSDP, loss = `soar_loss`'s own `out.loss`): the parity oracle.

All randomness is a function of (seed, step, global sample index), never of the rank or the world
size: the same global batch gives the same draws at any world size, and resume needs no RNG state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset

from soar_fast.config import SoarConfig
from soar_fast.distributed.checkpoint import (
    export_full_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from soar_fast.distributed.config import ParallelConfig
from soar_fast.distributed.env import (
    DistEnv,
    build_device_mesh,
    cleanup,
    init_distributed,
    is_main_process,
)
from soar_fast.distributed.loss import global_metrics, global_soar_loss
from soar_fast.distributed.parallelize import parallelize_sd3, unwrap_name
from soar_fast.distributed.sampler import ResumableDistributedSampler
from soar_fast.loss import SoarDraws, sample_draws, soar_loss_from_draws
from soar_fast.models import SD3VelocityFn, build_sd3_transformer

__all__ = ["SyntheticLatents", "main", "parse_args", "step_draws", "train"]

log = logging.getLogger("soar_fast.distributed.run")


class SyntheticLatents(Dataset):
    """Item i: (z0 [C, H, W], prompt_embeds [L, D], pooled [P]), drawn from a generator seeded by (seed, i)."""

    def __init__(self, size: int, seed: int, shape=(4, 8, 8), seq_len: int = 7, dim: int = 32, pooled: int = 64):
        self.size, self.seed, self.shape, self.seq_len, self.dim, self.pooled = size, seed, shape, seq_len, dim, pooled

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        z0 = torch.randn(self.shape, generator=g)
        return z0, torch.randn(self.seq_len, self.dim, generator=g), torch.randn(self.pooled, generator=g)


def step_draws(z0: torch.Tensor, indices: list[int], step: int, seed: int, config: SoarConfig) -> SoarDraws:
    """SOAR draws for a local batch: sample i's draws depend only on (seed, step, global index)."""
    parts = []
    for row, idx in enumerate(indices):
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_003 + int(idx)) % (2**63))
        parts.append(sample_draws(z0[row : row + 1].cpu(), config, g))
    dev = z0.device
    return SoarDraws(
        z1=torch.cat([p.z1 for p in parts]).to(dev),
        u0=torch.cat([p.u0 for p in parts]).to(dev),
        sigma0=torch.cat([p.sigma0 for p in parts]).to(dev),
        sigma1=torch.cat([p.sigma1 for p in parts]).to(dev),
        sigma_aux=torch.cat([p.sigma_aux for p in parts], dim=1).to(dev),
        drop=torch.cat([p.drop for p in parts]).to(dev),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m soar_fast.distributed.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder: losses.jsonl, ckpt/, export/")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global_batch", type=int, default=4, help="split evenly over ranks")
    p.add_argument("--dataset_size", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--num_aux", type=int, default=6)
    p.add_argument("--normalization", choices=["points", "sum"], default="points")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--ckpt_every", type=int, default=0, help="0: no checkpoints")
    p.add_argument("--keep_last", type=int, default=3)
    p.add_argument("--resume", choices=["auto", "never"], default="auto", help="auto: latest in <out>/ckpt")
    p.add_argument("--resume_from", type=Path, default=None, help="a checkpoint folder to start from")
    p.add_argument("--export", action="store_true", help="write <out>/export (diffusers folder) at the end")
    p.add_argument("--dump_grads_step", type=int, default=0, help="save full grads of this step (before clip)")
    p.add_argument("--shard", choices=["full", "hybrid"], default="full")
    p.add_argument("--shard_degree", type=int, default=None)
    p.add_argument("--no_activation_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--param_dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no_reshard_after_forward", action="store_true")
    p.add_argument("--count_collectives", action="store_true", help="log all-gather / reduce-scatter calls and bytes")
    p.add_argument("--die_at_step", type=int, default=0, help="(tests) one rank exits at this step, once")
    p.add_argument("--die_rank", type=int, default=1)
    p.add_argument("--die_marker", type=Path, default=None, help="(tests) the exit happens only if this file is absent")
    return p.parse_args(argv)


class _CollectiveCounter:
    """Counts calls and bytes of the collectives FSDP2 issues (names differ across torch versions)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.stats: dict[str, list[int]] = {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            big = max((t.numel() * t.element_size() for t in tensors), default=0)  # the unsharded side
            s = self.stats.setdefault(name, [0, 0])
            s[0], s[1] = s[0] + 1, s[1] + big
            return fn(*args, **kwargs)

        return counted

    def pop(self) -> dict[str, list[int]]:
        out, self.stats = self.stats, {}
        return out


def _fingerprint(model: torch.nn.Module) -> float:
    """Σ p² over all parameters in float64 (collective under FSDP): equal weights, equal number."""
    total = 0.0
    for p in model.parameters():
        s = p.detach().to(torch.float64).square().sum()
        total += float(s.full_tensor() if isinstance(s, DTensor) else s)
    return total


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[unwrap_name(name)] = g.detach().float().cpu().contiguous()
    return out


def _write_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop the rows of steps after the checkpoint (they are recomputed)."""
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if "event" in r or r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


class _Batches:
    """Local batches from the resumable sampler, rolling over epochs."""

    def __init__(self, sampler: ResumableDistributedSampler, size: int):
        self.sampler, self.size = sampler, size
        self.it = iter(sampler)

    def next(self) -> list[int]:
        got: list[int] = []
        while len(got) < self.size:
            try:
                got.append(next(self.it))
            except StopIteration:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self.it = iter(self.sampler)
        return got

    def restart(self) -> None:
        self.it = iter(self.sampler)


def train(args: argparse.Namespace) -> list[float]:
    """Run the loop; returns the per-step global losses of this invocation (all ranks)."""
    env: DistEnv = init_distributed()
    device = env.device
    param_dtype = args.param_dtype if args.param_dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    pcfg = ParallelConfig(shard=args.shard, shard_degree=args.shard_degree, compile=args.compile,
                          activation_checkpointing=not args.no_activation_checkpointing,
                          param_dtype=param_dtype, reshard_after_forward=not args.no_reshard_after_forward)
    mesh = build_device_mesh(env, pcfg)
    cfg = SoarConfig(num_aux=args.num_aux, normalization=args.normalization)
    out_dir: Path = args.out
    log_path, ckpt_root = out_dir / "losses.jsonl", out_dir / "ckpt"
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    counter = _CollectiveCounter() if args.count_collectives and env.distributed else None

    # Data: each rank takes its shard of the epoch order, global_batch / world_size per step.
    data = SyntheticLatents(args.dataset_size, args.seed)
    if args.global_batch % env.world_size:
        raise ValueError(f"--global_batch {args.global_batch} is not a multiple of {env.world_size} ranks")
    sampler = ResumableDistributedSampler(data, num_replicas=env.world_size, rank=env.rank, seed=args.seed)
    batches = _Batches(sampler, args.global_batch // env.world_size)

    model = build_sd3_transformer("tiny", seed=args.seed, num_layers=args.num_layers).to(device)
    model = parallelize_sd3(model, pcfg, mesh)
    velocity_fn = SD3VelocityFn(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2)
    uncond = (torch.zeros(data.seq_len, data.dim, device=device), torch.zeros(data.pooled, device=device))

    step = 0
    ckpt = args.resume_from or (latest_checkpoint(ckpt_root) if args.resume == "auto" else None)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model, opt)
        step = int(meta["step"])
        sampler.load_state_dict(meta["extra"]["sampler"])
        batches.restart()
        fp = _fingerprint(model)
        if is_main_process():
            _truncate_log(log_path, step)
            _write_row(log_path, {"event": "resume", "step": step, "from": str(ckpt), "world_size": env.world_size,
                                  "saved_world_size": meta["world_size"], "fingerprint": fp,
                                  "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))})

    losses = []
    while step < args.steps:
        step += 1
        if args.die_at_step == step and env.rank == args.die_rank and args.die_marker and not args.die_marker.exists():
            args.die_marker.touch()
            log.warning("rank %d exits at step %d (test of elastic restart)", env.rank, step)
            os._exit(17)
        t0 = time.perf_counter()
        idx = batches.next()
        items = [data[i] for i in idx]
        z0 = torch.stack([it[0] for it in items]).to(device)
        cond = (torch.stack([it[1] for it in items]).to(device), torch.stack([it[2] for it in items]).to(device))
        out = soar_loss_from_draws(velocity_fn, z0, cond, uncond, cfg, step_draws(z0, idx, step, args.seed, cfg))
        loss = global_soar_loss(out, cfg) if env.distributed else out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == args.dump_grads_step:
            grads = _full_grads(model)
            if is_main_process():
                from safetensors.torch import save_file

                save_file(grads, str(out_dir / f"grads_step{step}.safetensors"))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        opt.step()
        gm = global_metrics(out, cfg)  # global-batch means (one all-reduce)
        value = gm["loss"] if env.distributed else float(loss.detach())
        losses.append(value)
        row = {"step": step, "loss": value, "base_loss": gm["base_loss"], "aux_loss": gm["aux_loss"],
               "grad_norm": float(grad_norm), "world_size": env.world_size, "local_batch": len(idx),
               "time_s": time.perf_counter() - t0}
        if counter is not None:
            row["collectives"] = counter.pop()
        if is_main_process():
            _write_row(log_path, row)
            log.info("step %d loss %.6f grad_norm %.4f", step, value, float(grad_norm))
        if args.ckpt_every and step % args.ckpt_every == 0:
            extra = {"sampler": sampler.state_dict(), "seed": args.seed}
            save_checkpoint(ckpt_root, step, model, opt, extra=extra, keep_last=args.keep_last)
            fp = _fingerprint(model)
            if is_main_process():
                _write_row(log_path, {"event": "save", "step": step, "world_size": env.world_size, "fingerprint": fp})
    if args.export:
        export_full_state_dict(model, out_dir / "export")
    cleanup()
    return losses


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
