"""Metrics of generated digits: conditional accuracy, Frechet distance, exposure bias per sigma."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from soar_fast.eval.sampler import cfg_velocity, sampler_sigmas
from soar_fast.loss.cond import broadcast_uncond

__all__ = ["conditional_accuracy", "exposure_bias", "frechet_distance", "gaussian_stats", "precision_recall_coverage"]


@torch.no_grad()
def conditional_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` `[N, C, H, W]` that the classifier assigns their prompt's class `labels`."""
    return (classifier(images).argmax(1) == labels).float().mean().item()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean `[D]`, covariance `[D, D]`) of features `[N, D]`, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), with Tr((Σa Σb)^½) = Σ √eig(Σa^½ Σb Σa^½) (PSD-exact)."""
    mu_a, s_a = gaussian_stats(feat_a)
    mu_b, s_b = gaussian_stats(feat_b)
    w, v = np.linalg.eigh(s_a)
    sa_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sa_half @ s_b @ sa_half), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def precision_recall_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Manifold metrics of features `[N, D]` with k-nearest-neighbour balls (k excludes the point).

    precision: fraction of fake samples inside some real sample's k-NN ball (fidelity);
    recall: fraction of real samples inside some fake sample's k-NN ball (diversity), both from
    Kynkaanniemi et al. 2019; coverage: fraction of real samples whose own k-NN ball holds at least
    one fake sample (Naeem et al. 2020: diversity that outliers among the fakes cannot inflate).
    """
    r, f = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0, None))

    def radii(a: np.ndarray) -> np.ndarray:  # distance to the k-th neighbour other than itself
        return np.sort(dist(a, a), axis=1)[:, k]

    r_rad, f_rad, rf = radii(r), radii(f), dist(r, f)  # rf: [real, fake]
    return {"precision": float((rf <= r_rad[:, None]).any(0).mean()),
            "recall": float((rf <= f_rad[None, :]).any(1).mean()),
            "coverage": float((rf.min(1) <= r_rad).mean())}


@torch.no_grad()
def exposure_bias(velocity_fn, z0: torch.Tensor, cond: Any, uncond: Any, *, num_steps: int,
                  guidance_scale: float, shift: float, window: int, num_sigmas: int, seed: int) -> dict[str, list[float]]:
    """The model's velocity error on states its own sampler reaches vs on true forward states.

    For each probed sampler sigma σ_k: start on the true trajectory of (z0, z1) `window` sampler
    steps earlier, z_{σ_j} = (1 − σ_j) z0 + σ_j z1, run the model's own CFG Euler steps to σ_k,
    reaching ẑ, and measure mean((v_θ(ẑ, σ_k, c) − (ẑ − z0)/σ_k)²) — the SOAR correction target,
    the velocity that lands on z0 — against mean((v_θ(z_σk, σ_k, c) − (z1 − z0))²) on the true
    state (the two targets coincide when ẑ = z_σk). Also reports the state drift rms(ẑ − z_σk)
    and both errors times σ² (`x0_own`, `x0_true`): the MSE of the one-step clean-image estimate
    z − σ v, comparable across sigmas (the velocity errors grow like 1/σ²).
    Returns lists over the probed sigmas (descending): sigma, err_own, err_true, x0_own, x0_true, drift.
    """
    g = torch.Generator().manual_seed(seed)
    z0 = z0.float()
    z1 = torch.randn(z0.shape, generator=g).to(z0.device)
    sig = sampler_sigmas(num_steps, shift, z0.device)
    ks = np.unique(np.linspace(1, num_steps - 1, min(num_sigmas, num_steps - 1)).round().astype(int))
    ub = broadcast_uncond(uncond, cond, z0.shape[0])
    out: dict[str, list[float]] = {k: [] for k in ("sigma", "err_own", "err_true", "x0_own", "x0_true", "drift")}
    for k in ks.tolist():
        j = max(k - window, 0)
        z = (1 - sig[j]) * z0 + sig[j] * z1
        for i in range(j, k):
            s = sig[i].expand(z0.shape[0])
            z = z + (sig[i + 1] - sig[i]) * cfg_velocity(velocity_fn, z, s, cond, ub, guidance_scale)
        s_k = sig[k].expand(z0.shape[0])
        z_true = (1 - sig[k]) * z0 + sig[k] * z1
        v_own, v_true = velocity_fn(torch.cat([z, z_true]), torch.cat([s_k, s_k]),
                                    tuple(torch.cat([c, c]) for c in cond)).float().chunk(2)
        out["sigma"].append(float(sig[k]))
        out["err_own"].append(((v_own - (z - z0) / sig[k]) ** 2).mean().item())
        out["err_true"].append(((v_true - (z1 - z0)) ** 2).mean().item())
        out["drift"].append(((z - z_true) ** 2).mean().sqrt().item())
        out["x0_own"].append(out["err_own"][-1] * float(sig[k]) ** 2)
        out["x0_true"].append(out["err_true"][-1] * float(sig[k]) ** 2)
    return out
