"""SOAR's normalisation over the global batch (SOAR.md: "Across ranks the counts are global").

Each rank holds per-sample losses of its local batch. The base count B and the auxiliary count
M·B are all-reduced, and the local sum is divided by the global count and multiplied by the world
size: FSDP averages gradients over ranks, so after that average the gradient is exactly the one
of a single process seeing the global batch (the reference release does the same). Local batches
may differ in size between ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from soar_fast.config import SoarConfig
from soar_fast.loss import SoarOutput

__all__ = ["global_batch_scale", "global_loss_value", "global_metrics", "global_soar_loss"]


def _active(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def global_soar_loss(out: SoarOutput, config: SoarConfig, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The rank-local term whose gradient, averaged over the ranks of `group`, is the gradient of
    the global-batch SOAR loss. `group` must be the whole data-parallel group (default: world).

    'points': W·(Σ_local L_base + λ Σ_local L_aux) / (B_g + λ·(M·B)_g).
    'sum':    W·(Σ_local L_base / B_g + λ Σ_local L_aux / (M·B)_g).
    Without a process group (or world 1) this equals `out.loss`. Every rank needs at least one
    sample: a rank without one would skip the model's forward and its FSDP collectives.
    """
    base, aux = out.base_losses, out.aux_losses
    counts = torch.tensor([base.numel(), aux.numel()], dtype=torch.float64, device=base.device)
    world = 1
    if _active(group):
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        world = dist.get_world_size(group)
    n_base, n_aux = counts.tolist()
    if n_base == 0:
        raise ValueError("global_soar_loss: the global batch is empty")
    lam = config.lambda_aux
    aux_sum = aux.sum()  # 0 (still in the graph) when M = 0
    if config.normalization == "points":
        loss = (base.sum() + lam * aux_sum) / (n_base + lam * n_aux)
    else:
        loss = base.sum() / n_base
        if n_aux > 0:
            loss = loss + lam * aux_sum / n_aux
    return loss * world


def global_batch_scale(local_batch: int, group: dist.ProcessGroup | None = None) -> float:
    """W·B_local/B_global: the factor that turns a rank's own SOAR loss (normalised by its local
    counts, as `batched_soar_step` does) into `global_soar_loss`'s term. For both normalisations
    the local denominators are B(1 + λM) or B and MB, the global ones the same in B_global, so one
    factor serves. 1 without a process group. Collective (one all-reduce of the batch size)."""
    if not _active(group):
        return 1.0
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    n = torch.tensor([float(local_batch)], dtype=torch.float64, device=dev)
    dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return dist.get_world_size(group) * local_batch / float(n.item())


def global_loss_value(local_loss: torch.Tensor, group: dist.ProcessGroup | None = None) -> float:
    """The global-batch loss as a float (for logging): Σ_ranks local_loss / W. Collective."""
    v = local_loss.detach().to(torch.float64).reshape(1).clone()
    if not _active(group):
        return float(v)
    dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)
    return float(v) / dist.get_world_size(group)


def global_metrics(out: SoarOutput, config: SoarConfig, group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Loss, base loss and aux loss over the global batch (one all-reduce), for logging.

    'loss' equals `global_loss_value(global_soar_loss(out, config))` without a second collective.
    """
    base, aux = out.base_losses.detach(), out.aux_losses.detach()
    t = torch.stack([base.sum(), aux.sum()]).to(torch.float64)
    t = torch.cat([t, torch.tensor([base.numel(), aux.numel()], dtype=torch.float64, device=t.device)])
    if _active(group):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    s_base, s_aux, n_base, n_aux = t.tolist()
    lam = config.lambda_aux
    if config.normalization == "points":
        loss = (s_base + lam * s_aux) / (n_base + lam * n_aux)
    else:
        loss = s_base / n_base + (lam * s_aux / n_aux if n_aux else 0.0)
    return {"loss": loss, "base_loss": s_base / n_base, "aux_loss": s_aux / n_aux if n_aux else 0.0,
            "num_samples": n_base, "num_aux_points": n_aux}
