"""Scaling on paper: FSDP2 communication volume of one SOAR step, from exact parameter counts.

    python -m soar_fast.distributed.scaling            # the table of docs/distributed.md

The parameter counts come from the preset built on the meta device (no memory, no download).
How many times FSDP2 all-gathers each unit per step is measured on the tiny model by the 2-rank
test (`--count_collectives`) and depends on the number of forwards, not on the model size:
with reshard_after_forward, a transformer block is gathered once per forward (base, rollout,
M auxiliary) and once per recorded graph in backward (base, M auxiliary); the root unit
(embeddings, final norm and projection) is gathered once per forward and once in backward.
Gradients are reduce-scattered once per unit per step. Bandwidths are assumptions (nominal link
rates times an efficiency), and the single-GPU compute time T1 is NOT YET MEASURED.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

__all__ = ["CommVolume", "all_gathers_per_step", "comm_volume", "count_sd3_params", "estimate_table", "main"]

NVLINK_GBPS = 450.0  # H100 SXM NVLink 4: 900 GB/s bidirectional, 450 GB/s per direction (nominal)
IB_GBPS = 50.0  # one 400 Gb/s NDR InfiniBand NIC per GPU (nominal)
EFFICIENCY = 0.8  # assumed fraction of the nominal rate NCCL reaches (bus bandwidth); measure with nccl-tests


def count_sd3_params(preset: str = "sd35-medium") -> tuple[int, int]:
    """(parameters in transformer_blocks, parameters in the root unit), built on the meta device."""
    from soar_fast.models.spec import get_family

    model = get_family("sd3").build(preset, seed=None, device="meta")
    blocks = sum(p.numel() for p in model.transformer_blocks.parameters())
    return blocks, sum(p.numel() for p in model.parameters()) - blocks


def all_gathers_per_step(num_aux: int, reshard_after_forward: bool = True) -> tuple[int, int]:
    """(gathers of each block unit, gathers of the root unit) per SOAR step, eager loss, one
    forward per point. reshard_after_forward=False is the count measured at M = 6 on the tiny model."""
    if not reshard_after_forward:
        if num_aux != 6:
            raise ValueError("the reshard_after_forward=False count is measured for num_aux=6 only")
        return 7, 1
    forwards = 1 + (1 + num_aux if num_aux > 0 else 0)  # base, rollout (2B, no grad), M aux
    return forwards + 1 + num_aux, forwards + 1


@dataclass
class CommVolume:
    """Bytes per rank per step: gathered parameter bytes (the unsharded size of each all-gather,
    summed) and reduce-scattered gradient bytes (the unsharded size)."""

    all_gather_bytes: float
    reduce_scatter_bytes: float


def comm_volume(blocks: int, root: int, num_aux: int, param_bytes: int = 2, reduce_bytes: int = 4,
                reshard_after_forward: bool = True) -> CommVolume:
    g_block, g_root = all_gathers_per_step(num_aux, reshard_after_forward)
    return CommVolume((g_block * blocks + g_root * root) * param_bytes, (blocks + root) * reduce_bytes)


def _ring(size: float, n: int, bus_gbps: float) -> float:
    """Seconds of an all-gather / reduce-scatter of `size` bytes (full size) over n ranks."""
    return 0.0 if n <= 1 else size * (n - 1) / n / (bus_gbps * 1e9)


def estimate_table(num_aux: int = 6, gpus_per_node: int = 8, worlds=(8, 64, 512)) -> list[dict]:
    """Communication seconds per step (not overlapped) for full and hybrid shard, per world size."""
    blocks, root = count_sd3_params()
    vol = comm_volume(blocks, root, num_aux)
    nv, ib = NVLINK_GBPS * EFFICIENCY, IB_GBPS * EFFICIENCY
    rows = []
    for w in worlds:
        inter = w > gpus_per_node
        full = _ring(vol.all_gather_bytes, w, ib if inter else nv) + _ring(vol.reduce_scatter_bytes, w, ib if inter else nv)
        shard = min(w, gpus_per_node)
        replicas = w // shard
        grad_shard = vol.reduce_scatter_bytes / shard
        hybrid = (_ring(vol.all_gather_bytes, shard, nv) + _ring(vol.reduce_scatter_bytes, shard, nv)
                  + 2 * _ring(grad_shard, replicas, ib))  # all-reduce = reduce-scatter + all-gather
        rows.append({"gpus": w, "nodes": max(1, w // gpus_per_node), "full_shard_s": full, "hybrid_shard_s": hybrid,
                     "inter_node_bytes_hybrid": 2 * grad_shard * (replicas - 1) / max(replicas, 1)})
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num_aux", type=int, default=6)
    args = p.parse_args(argv)
    blocks, root = count_sd3_params()
    vol = comm_volume(blocks, root, args.num_aux)
    vol_nr = comm_volume(blocks, root, args.num_aux, reshard_after_forward=False) if args.num_aux == 6 else None
    gb, gr = all_gathers_per_step(args.num_aux)
    lines = [
        f"parameters: {blocks + root:,} ({blocks:,} in the transformer blocks, {root:,} in the root unit)",
        f"all-gathers per step: {gb} per block, {gr} for the root (M = {args.num_aux}, reshard_after_forward)",
        f"all-gather volume per step per rank (bf16, unsharded size): {vol.all_gather_bytes / 1e9:.2f} GB",
        f"reduce-scatter volume per step per rank (fp32, unsharded size): {vol.reduce_scatter_bytes / 1e9:.2f} GB",
    ]
    if vol_nr is not None:
        lines.append(f"all-gather volume with reshard_after_forward=False: {vol_nr.all_gather_bytes / 1e9:.2f} GB")
    lines.append("| GPUs | nodes | full shard comm (s) | hybrid shard comm (s) | hybrid inter-node bytes/GPU (GB) |")
    lines.append("|---:|---:|---:|---:|---:|")
    for r in estimate_table(args.num_aux):
        lines.append(f"| {r['gpus']} | {r['nodes']} | {r['full_shard_s']:.3f} | {r['hybrid_shard_s']:.3f} "
                     f"| {r['inter_node_bytes_hybrid'] / 1e9:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
