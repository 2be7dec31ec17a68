"""The batched SOAR step: base and auxiliary states through the model as one (1+M)B batch.

Same math and same draws as the eager reference (`soar_fast.loss.soar`), arranged for speed:
the rollout runs through a `RolloutEngine` (eager | CUDA graph | FP8), z' comes from the fused
aux-state op (v_corr is never stored), and the per-row losses and dL/dv come from one pass of
the fused loss op, which recomputes the correction targets from z'. With `micro_chunks > 1` the batch is split into
sample groups that each run forward and backward alone (same gradient, less activation memory),
so this function performs the backward pass itself when `backward=True`.

Several rollout paths (`num_rollout_paths` P) make it (1+P·M)B rows, a fixed count: the points of
samples at u1 = 0 are computed with row coefficient 0 (`point_mask`), so shapes never change with
the draws. Path 0 goes through the fused aux-state op, paths 1..P-1 through the fused path-state
op (their stochastic steps and re-noising in one launch).
"""

from __future__ import annotations

import torch

from soar_fast.config import ConfigError, SoarConfig
from soar_fast.fast.profiling import nvtx_range
from soar_fast.fast.rollout import RolloutEngine
from soar_fast.loss.cond import Cond, as_tuple, broadcast_uncond, like, repeat_cond, where_cond
from soar_fast.loss.paths import aux_model_sigma, point_mask, points_per_path, sigma_max_value
from soar_fast.loss.schedule import loss_weight
from soar_fast.loss.soar import SoarDraws, SoarOutput, VelocityFn, loss_metrics, rollout_metrics
from soar_fast.ops import soar_aux_z, soar_fused_mse, soar_fused_mse_and_grad, soar_path_states

__all__ = ["batched_soar_step", "row_coefficients"]


def row_coefficients(b: int, m: int, config: SoarConfig, device: torch.device,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """c [(1+R)B] with loss = Σ_rows c_row · L_row, for either normalisation of SOAR.md; R = m
    point rows (P·M with several paths). `mask` `[R, B]` (bool): the points that exist (several
    paths); the others get c = 0 and the counts are theirs, as device tensors (no host sync)."""
    lam = config.lambda_aux
    if mask is not None:
        n = mask.sum().to(torch.float32)
        if config.normalization == "points":
            base = (1.0 / (b + lam * n)).expand(b)
            aux = lam / (b + lam * n) * mask.flatten().float()
        else:
            base = torch.full((b,), 1.0 / b, device=mask.device)
            aux = lam / n.clamp_min(1) * mask.flatten().float()
        return torch.cat([base.to(device), aux.to(device)]).to(torch.float32)
    if config.normalization == "points":
        base = aux = 1.0 / (b + lam * m * b)
        aux = lam * aux
    else:
        base, aux = 1.0 / b, (lam / (m * b) if m > 0 else 0.0)
    return torch.cat([torch.full((b,), base), torch.full((m * b,), aux)]).to(device=device, dtype=torch.float32)


def _scale_grad(grad_v: torch.Tensor, scale: float | torch.Tensor | tuple, nb: int) -> torch.Tensor:
    """grad_v of a chunk's rows (nb base rows, then the point rows) times the gradient scale."""
    if isinstance(scale, tuple):
        base, aux = (torch.as_tensor(s, device=grad_v.device, dtype=torch.float32) for s in scale)
        rows = torch.cat([base.expand(nb), aux.expand(grad_v.shape[0] - nb)])
        return grad_v * rows.view(-1, *([1] * (grad_v.dim() - 1))).to(grad_v.dtype)
    if isinstance(scale, torch.Tensor):
        return grad_v * scale.to(grad_v.dtype)
    return grad_v * scale if scale != 1.0 else grad_v


def batched_soar_step(
    velocity_fn: VelocityFn,
    z0: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    config: SoarConfig,
    draws: SoarDraws,
    *,
    rollout: RolloutEngine | None = None,
    ops_backend: str = "auto",
    micro_chunks: int = 1,
    backward: bool = True,
    grad_scale: float | torch.Tensor | tuple[torch.Tensor, torch.Tensor] = 1.0,
) -> SoarOutput:
    """One SOAR step with the given draws. With `backward=True` gradients are accumulated into
    the parameters and `.loss` is detached; with `backward=False` (needs micro_chunks=1) `.loss`
    keeps its graph, like `soar_loss`. `grad_scale` multiplies the gradient only (e.g. 1/k for k
    accumulated micro-batches; a 0-d device tensor; or a pair scaling the base rows and the
    auxiliary rows apart, for global point counts); `.loss` stays the unscaled SOAR loss."""
    if not backward and micro_chunks != 1:
        raise ValueError("batched_soar_step: micro_chunks > 1 runs backward per chunk; pass backward=True")
    if config.target_dtype == "model" and z0.dtype in (torch.float16, torch.bfloat16):
        raise ConfigError(f"SoarConfig.target_dtype='model' with {str(z0.dtype).removeprefix('torch.')} latents "
                          "is not supported by the batched step (its fused ops form targets in fp32); "
                          "use the eager reference (runtime.step='eager') or target_dtype='fp32'")
    z0 = z0.float() if z0.dtype != torch.float64 else z0
    compute = z0.dtype
    b = z0.shape[0]
    z1, sigma0, sigma1, sigma_aux = draws.z1.to(compute), draws.sigma0, draws.sigma1, draws.sigma_aux
    m = sigma_aux.shape[0]  # point rows, P·M
    mp = points_per_path(m, config)  # points per path, M
    mask = point_mask(draws.u0, config) if m > 0 else None
    uncond_b = broadcast_uncond(uncond, cond, b)
    cond = where_cond(draws.drop, uncond_b, cond)
    s0 = sigma0.to(compute).view(b, *([1] * (z0.dim() - 1)))
    z_t = (1 - s0) * z0 + s0 * z1
    metrics: dict[str, torch.Tensor] = {}

    if m > 0:
        engine = rollout or RolloutEngine(velocity_fn)
        with nvtx_range("soar/rollout"):
            v_u, v_c = engine(z_t, sigma0, uncond_b, cond)
        with nvtx_range("soar/aux_states"):
            z_aux = soar_aux_z(z0, z1, v_u, v_c, sigma0, sigma1, sigma_aux[:mp], config.guidance_scale,
                               backend=ops_backend)
            if m > mp:  # paths 1..P-1: one stochastic step each and its points, one fused launch
                if draws.sde_noise is None:
                    raise ValueError(f"draws have {m} point rows for num_aux={mp} but no sde_noise: "
                                     "draw them with the same SoarConfig (num_rollout_paths)")
                z_sde = soar_path_states(z0, z1, v_u, v_c, sigma0, sigma1, sigma_aux[mp:], draws.sde_noise,
                                         config.guidance_scale, config.sde_rollout_type, config.sde_noise_scale,
                                         sigma_max_value(config.shift), backend=ops_backend)
                z_aux = torch.cat([z_aux, z_sde.to(z_aux.dtype)])
        metrics = rollout_metrics(z0, z1, v_u, v_c, sigma0, sigma1, sigma_aux[:mp], config.guidance_scale)
    else:
        z_aux = z0.new_zeros(0, *z0.shape[1:])

    coeff = row_coefficients(b, m, config, z0.device, mask)  # [(1+M)B], rows: base b, then point-major
    sig_model = aux_model_sigma(sigma_aux, config)  # what the model sees; targets use σ' itself
    row_losses, total = [], z0.new_zeros(())
    for idx in torch.arange(b, device=z0.device).tensor_split(micro_chunks):
        if idx.numel() == 0:
            continue
        rows = torch.cat([idx] + [b + i * b + idx for i in range(m)])  # this group's rows
        sa = sigma_aux[:, idx]
        z_in = torch.cat([z_t[idx], z_aux.view(m, b, *z0.shape[1:])[:, idx].reshape(-1, *z0.shape[1:])])
        sig_in = torch.cat([sigma0[idx], sig_model[:, idx].reshape(-1)])
        cond_in = repeat_cond(like(cond, [c[idx] for c in as_tuple(cond)]), 1 + m)
        w = loss_weight(torch.cat([sigma0[idx], sa.reshape(-1)]), config.weighting)
        with nvtx_range("soar/forward"):
            v = velocity_fn(z_in, sig_in, cond_in)
        if backward:
            # one pass for loss and dL/dv, the row coefficients folded into the weights; then
            # backpropagate through the model only
            with nvtx_range("soar/loss_and_grad"):
                c = coeff[rows]
                losses_c, grad_v = soar_fused_mse_and_grad(v, z0[idx], z1[idx], z_in[idx.numel():], sa, w * c,
                                                           backend=ops_backend)
                grad_v = _scale_grad(grad_v, grad_scale, idx.numel())
                c = c.to(losses_c.dtype)
                losses = torch.where(c > 0, losses_c / c.clamp_min(1e-30), torch.zeros_like(losses_c))
                chunk_loss = losses_c.sum()
            with nvtx_range("soar/backward"):
                if v.requires_grad:  # not when every row went to a frozen part (a Wan 2.2 expert not trained)
                    v.backward(grad_v)
        else:
            losses = soar_fused_mse(v, z0[idx], z1[idx], z_in[idx.numel():], sa, w, backend=ops_backend)
            chunk_loss = (coeff[rows].to(losses.dtype) * losses).sum()
        total = total + chunk_loss
        row_losses.append((rows, losses))

    all_losses = torch.empty((1 + m) * b, device=z0.device, dtype=row_losses[0][1].dtype)
    if not backward:
        all_losses = row_losses[0][1]
    else:
        for rows, losses in row_losses:
            all_losses[rows] = losses
    base_losses, aux_losses = all_losses[:b], all_losses[b:].view(m, b)
    if mask is not None:  # points that do not exist read 0, as in the eager reference
        aux_losses = torch.where(mask, aux_losses, torch.zeros_like(aux_losses))
    metrics = {**loss_metrics(total, base_losses, aux_losses, sigma0, mask), **metrics}
    return SoarOutput(loss=total, stats=metrics, base_losses=base_losses, aux_losses=aux_losses)
