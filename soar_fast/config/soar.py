"""`SoarConfig`: the fields of ../shared/SOAR.md, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from soar_fast.config.errors import ConfigError

Weighting = Literal["logit_normal", "none", "sigma_sqrt", "cosmap"]
Normalization = Literal["points", "sum"]

WEIGHTINGS: tuple[str, ...] = ("logit_normal", "none", "sigma_sqrt", "cosmap")
NORMALIZATIONS: tuple[str, ...] = ("points", "sum")


def _fail(field: str, value: object, need: str) -> None:
    raise ConfigError(f"SoarConfig.{field}={value!r} is invalid: {need}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(kw_only=True)
class SoarConfig:
    """One SOAR step (the contract of SOAR.md). `num_aux=0` or `lambda_aux=0` is plain SFT."""

    num_aux: int = 6
    """M, auxiliary re-noised points per sample (paper: 6; an ablation uses 4). 0 gives SFT."""
    rollout_steps: int = 40
    """N, sampler steps the one-step rollout mimics: u1 = max(u0 - 1/N, 0)."""
    guidance_scale: float = 4.5
    """g, classifier-free guidance of the rollout: v_cfg = v_u + g (v_c - v_u)."""
    lambda_aux: float = 1.0
    """λ, weight of the auxiliary loss. 0 gives SFT."""
    sigma_hi_ratio: float | None = None
    """None: σ' ~ U[σ1, 1] (reference release). r > 0: σ' ~ U[σ1, min(r σ0, 1)] (paper option, 1.5)."""
    sigma_min: float = 1e-3
    """Floor of σ' so that v_corr = (z' - z0)/σ' never divides by ~0 (when σ1 = 0)."""
    shift: float = 3.0
    """s of the SD3 scheduler shift σ(u) = s u / (1 + (s - 1) u); 3.0 for SD3.5."""
    logit_mean: float = 0.0
    """Mean of the logit-normal training-time density."""
    logit_std: float = 1.0
    """Std of the logit-normal training-time density."""
    weighting: Weighting = "logit_normal"
    """Loss weight w(σ): 'logit_normal'/'none' (w = 1), 'sigma_sqrt' (σ^-2), 'cosmap' (diffusers)."""
    normalization: Normalization = "points"
    """'points': (Σ base + λ Σ aux) / (B + λ M B) (reference release); 'sum': mean base + λ mean aux."""
    timestep_quantization: bool = False
    """Quantize u and σ to the scheduler's 1000-entry table, as the reference release does."""
    cond_dropout: float = 0.0
    """Per-sample probability of training on the empty prompt (for CFG-capable SFT)."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_aux, int) or isinstance(self.num_aux, bool) or self.num_aux < 0:
            _fail("num_aux", self.num_aux, "need an integer >= 0 (0 gives plain SFT)")
        if not isinstance(self.rollout_steps, int) or isinstance(self.rollout_steps, bool) or self.rollout_steps < 1:
            _fail("rollout_steps", self.rollout_steps, "need an integer >= 1 (the paper uses 40)")
        if not _is_number(self.guidance_scale) or self.guidance_scale < 0:
            _fail("guidance_scale", self.guidance_scale, "need a finite number >= 0 (the paper uses 4.5)")
        if not _is_number(self.lambda_aux) or self.lambda_aux < 0:
            _fail("lambda_aux", self.lambda_aux, "need a finite number >= 0 (0 gives plain SFT)")
        if self.sigma_hi_ratio is not None and (not _is_number(self.sigma_hi_ratio) or self.sigma_hi_ratio <= 0):
            _fail("sigma_hi_ratio", self.sigma_hi_ratio, "need None (σ_hi = 1) or a number > 0, e.g. 1.5")
        if not _is_number(self.sigma_min) or not 0 < self.sigma_min <= 1:
            _fail("sigma_min", self.sigma_min, "need a sigma in (0, 1], e.g. 1e-3")
        if not _is_number(self.shift) or self.shift <= 0:
            _fail("shift", self.shift, "need a number > 0 (3.0 for SD3.5)")
        if not _is_number(self.logit_mean):
            _fail("logit_mean", self.logit_mean, "need a finite number (default 0.0)")
        if not _is_number(self.logit_std) or self.logit_std <= 0:
            _fail("logit_std", self.logit_std, "need a number > 0 (default 1.0)")
        if self.weighting not in WEIGHTINGS:
            _fail("weighting", self.weighting, f"choose one of {', '.join(WEIGHTINGS)}")
        if self.normalization not in NORMALIZATIONS:
            _fail("normalization", self.normalization, f"choose one of {', '.join(NORMALIZATIONS)}")
        if not isinstance(self.timestep_quantization, bool):
            _fail("timestep_quantization", self.timestep_quantization, "need true or false")
        if not _is_number(self.cond_dropout) or not 0 <= self.cond_dropout <= 1:
            _fail("cond_dropout", self.cond_dropout, "need a probability in [0, 1]")

    @property
    def is_sft(self) -> bool:
        """True when no auxiliary term is computed (M = 0 or λ = 0)."""
        return self.num_aux == 0 or self.lambda_aux == 0
