"""`SoarConfig`: the fields of ../shared/SOAR.md, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from soar_fast.config.errors import ConfigError

Weighting = Literal["logit_normal", "none", "sigma_sqrt", "cosmap"]
Normalization = Literal["points", "sum"]
AuxTimestep = Literal["sigma", "table"]
SdeRolloutType = Literal["simple", "sde", "flow_sde", "cps"]
CondDropoutPer = Literal["sample", "batch"]
TargetDtype = Literal["fp32", "model"]
TimeDensity = Literal["logit_normal", "by_weighting"]
RolloutGuidance = Literal["auto", "cfg", "distilled"]

WEIGHTINGS: tuple[str, ...] = ("logit_normal", "none", "sigma_sqrt", "cosmap")
NORMALIZATIONS: tuple[str, ...] = ("points", "sum")
AUX_TIMESTEPS: tuple[str, ...] = ("sigma", "table")
SDE_ROLLOUT_TYPES: tuple[str, ...] = ("simple", "sde", "flow_sde", "cps")
COND_DROPOUT_PERS: tuple[str, ...] = ("sample", "batch")
TARGET_DTYPES: tuple[str, ...] = ("fp32", "model")
TIME_DENSITIES: tuple[str, ...] = ("logit_normal", "by_weighting")
ROLLOUT_GUIDANCES: tuple[str, ...] = ("auto", "cfg", "distilled")


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
    """g, classifier-free guidance of the rollout: v_cfg = v_u + g (v_c - v_u). With a distilled
    rollout (`rollout_guidance`) g is the value fed to the model's guidance embedding instead."""
    rollout_guidance: RolloutGuidance = "auto"
    """How the rollout is guided. 'cfg': true CFG, one 2B pass (empty prompt + prompt) combined with
    g. 'distilled': one B pass of the prompt with g in the guidance embedding of a guidance-distilled
    model (FLUX.1-dev, FLUX.2-dev: they were distilled away from the unconditional branch).
    'auto': distilled for a model with a guidance embedding, else cfg (docs/families.md)."""
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
    """Probability of training on the empty prompt (for CFG-capable SFT); see `cond_dropout_per`."""
    cond_dropout_per: CondDropoutPer = "sample"
    """'sample': one dropout draw per sample (ours); 'batch': one draw drops the whole batch
    (the reference release; keyed draws make it one draw per optimizer step)."""
    aux_timestep: AuxTimestep = "sigma"
    """Timestep the model sees at an aux point. 'sigma': 1000·σ', the σ' of the target (ours).
    'table': the release's scheduler-table entry of σ' (its searchsorted, then ⌊(1 − t)·1000⌋ with
    its float32 rounding), while z', v_corr and the weight keep the continuous σ' (so with 'table'
    `timestep_quantization` quantizes σ0 and σ1 only)."""
    num_rollout_paths: int = 1
    """P. Path 0 is the ODE (Euler) step; paths 1..P-1 take one stochastic step from z_t with v_cfg,
    only for samples with u1 > 0. Every path gets its own `num_aux` points toward the same z1."""
    sde_rollout_type: SdeRolloutType = "flow_sde"
    """Step of paths 1..P-1: 'simple' (additive Euler-Maruyama), 'sde' (x0, then fresh noise at σ1),
    'flow_sde' (the flow-GRPO reverse SDE), 'cps' (coefficients-preserving sampling)."""
    sde_noise_scale: float = 0.5
    """Noise scale of the stochastic paths (the release's `sde_noise_scale`)."""
    target_dtype: TargetDtype = "fp32"
    """'fp32': z_t, ẑ, z' and v_corr formed in fp32 (ours). 'model': formed in the dtype of the
    latents the step is given, as the release does under bf16 (eager reference only)."""
    time_density: TimeDensity = "logit_normal"
    """Training-time draw: 'logit_normal' always (ours), or 'by_weighting' (the release, via diffusers'
    compute_density_for_timestep_sampling): uniform for 'sigma_sqrt'/'cosmap', logit-normal otherwise."""

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
        for name, choices in (("cond_dropout_per", COND_DROPOUT_PERS), ("aux_timestep", AUX_TIMESTEPS),
                              ("sde_rollout_type", SDE_ROLLOUT_TYPES), ("target_dtype", TARGET_DTYPES),
                              ("time_density", TIME_DENSITIES), ("rollout_guidance", ROLLOUT_GUIDANCES)):
            if getattr(self, name) not in choices:
                _fail(name, getattr(self, name), f"choose one of {', '.join(choices)}")
        p = self.num_rollout_paths
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            _fail("num_rollout_paths", p, "need an integer >= 1 (1 is the ODE path only)")
        if not _is_number(self.sde_noise_scale) or self.sde_noise_scale < 0:
            _fail("sde_noise_scale", self.sde_noise_scale, "need a finite number >= 0 (the release uses 0.5)")

    @classmethod
    def reference_release(cls, **overrides: object) -> SoarConfig:
        """Every choice the public reference release makes (Tencent-Hunyuan/HY-SOAR, HEAD 59f0e02:
        the `parse_args` defaults of soar/train_soar_sd3_5m.py and soar/utils/algorithm.py), so
        that its training step is reproduced on the same draws; `overrides` change any field.
        docs/reference_release.md lists where these differ from our defaults."""
        release: dict[str, object] = dict(
            num_aux=6,  # --trajectory_length
            rollout_steps=40,  # --num_sampling_steps
            guidance_scale=4.5,  # --cfg_scale_sampling
            rollout_guidance="cfg",  # true CFG, one 2B forward (SD3.5 has no guidance embedding)
            lambda_aux=1.0,  # --lambda_aux
            sigma_hi_ratio=None,  # --sigma_upper_ratio 1.5 is passed but σ_hi = 1 always
            sigma_min=1e-3,  # no floor there; σ' >= σ1 >= table[999] ≈ 0.003, so 1e-3 never binds
            shift=3.0,  # the SD3.5-Medium scheduler config
            logit_mean=0.0, logit_std=1.0, weighting="logit_normal",  # --logit_mean/--logit_std/--weighting_scheme
            normalization="points",  # (Σ base + λ Σ aux) / (B + λ·#points), global counts
            timestep_quantization=True,  # σ0, σ1 are scheduler-table entries
            cond_dropout=0.0, cond_dropout_per="batch",  # --cond_dropout_rate, one random.random() per batch
            aux_timestep="table",  # sigma_to_t then t_to_sigma_timestep for the model call
            num_rollout_paths=1, sde_rollout_type="flow_sde", sde_noise_scale=0.5,
            target_dtype="model",  # targets in weight_dtype (bf16 under --mixed_precision bf16)
            time_density="by_weighting",  # compute_density_for_timestep_sampling
        )
        release.update(overrides)
        return cls(**release)  # type: ignore[arg-type]

    @property
    def num_points(self) -> int:
        """P·M, auxiliary points drawn per sample (0 for SFT); paths 1..P-1 exist only where u1 > 0."""
        return 0 if self.is_sft else self.num_aux * self.num_rollout_paths

    @property
    def is_sft(self) -> bool:
        """True when no auxiliary term is computed (M = 0 or λ = 0)."""
        return self.num_aux == 0 or self.lambda_aux == 0
