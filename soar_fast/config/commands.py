"""The configs of the `sample`, `eval`, `demo` and `study` commands (kw-only dataclasses, one-line checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from soar_fast.config.train import _fail, _flat, _int, _num

__all__ = ["DemoConfig", "EvalConfig", "SampleConfig", "StudyConfig"]


@dataclass(kw_only=True)
class SampleConfig:
    """`soar-fast sample`: Euler + CFG samples of a trained run, as a PNG grid."""

    run_dir: Annotated[str, _flat("run_dir")]
    """Run folder of `soar-fast train` (holds config.json and final/ or checkpoints/)."""
    weights: Literal["final", "online"] = "final"
    """'final': <run_dir>/final/transformer (the EMA weights of a --use_ema run); 'online': the last
    optimizer step's weights of a --use_ema run (<run_dir>/final/transformer_online)."""
    num_samples: Annotated[int, _flat("num_samples")] = 20
    """Images to draw (spread over the classes)."""
    class_label: int | None = None
    """Draw only this class (digits); None cycles through all classes."""
    num_inference_steps: Annotated[int, _flat("num_inference_steps")] = 40
    """Euler steps from sigma 1 to 0."""
    guidance_scale: Annotated[float, _flat("guidance_scale")] = 4.5
    """Classifier-free guidance scale (1 = conditional only, 0 = unconditional)."""
    seed: Annotated[int, _flat("seed")] = 0
    """Seed of the initial noise."""
    output: str | None = None
    """PNG path (default <run_dir>/samples/sample.png)."""

    def __post_init__(self) -> None:
        _check_sampling(self.num_samples, self.num_inference_steps, self.guidance_scale, self.seed)
        if self.class_label is not None and not _int(self.class_label, 0):
            _fail("class_label", self.class_label, "need a class index >= 0 or None")


@dataclass(kw_only=True)
class EvalConfig:
    """`soar-fast eval`: conditional accuracy, Frechet distance and exposure bias of a run."""

    run_dir: Annotated[str, _flat("run_dir")]
    """Run folder of `soar-fast train`."""
    weights: Literal["final", "online"] = "final"
    """'final': <run_dir>/final/transformer (the EMA weights of a --use_ema run); 'online': the last
    optimizer step's weights of a --use_ema run (<run_dir>/final/transformer_online)."""
    num_samples: Annotated[int, _flat("num_samples")] = 500
    """Generated images for accuracy and Frechet distance (spread evenly over the classes)."""
    num_inference_steps: Annotated[int, _flat("num_inference_steps")] = 40
    """Euler steps from sigma 1 to 0 (the paper evaluates with 40)."""
    guidance_scale: Annotated[float, _flat("guidance_scale")] = 4.5
    """Classifier-free guidance scale (the paper evaluates with 4.5)."""
    seed: Annotated[int, _flat("seed")] = 0
    """Seed of the sampler noise and the exposure-bias draws."""
    batch_size: int = 500
    """Images per sampler batch."""
    exposure_samples: int = 200
    """Real images whose trajectories probe exposure bias (0 skips it)."""
    exposure_window: int = 3
    """Sampler steps the model runs on its own before its velocity error is measured."""
    exposure_sigmas: int = 13
    """How many sigmas of the sampler grid exposure bias is measured at."""
    classifier_dir: str | None = None
    """Where the digits classifier is cached (default <run_dir>/classifier)."""

    def __post_init__(self) -> None:
        _check_sampling(self.num_samples, self.num_inference_steps, self.guidance_scale, self.seed)
        if not _int(self.batch_size, 1):
            _fail("batch_size", self.batch_size, "need an integer >= 1")
        if not _int(self.exposure_samples, 0):
            _fail("exposure_samples", self.exposure_samples, "need an integer >= 0 (0 skips exposure bias)")
        if not _int(self.exposure_window, 1):
            _fail("exposure_window", self.exposure_window, "need an integer >= 1")
        if not _int(self.exposure_sigmas, 1):
            _fail("exposure_sigmas", self.exposure_sigmas, "need an integer >= 1")


@dataclass(kw_only=True)
class StudyConfig:
    """`soar-fast study`: pretrain (or reuse) one digits base on the noisy "web" digits, post-train it
    on the curated real digits with SFT and SOAR over K seeds at equal iterations and data order,
    evaluate base / SFT / SOAR at several guidance scales and along training, write report.md with
    mean +- std bands and the paired SOAR - SFT comparison, and study.json with every number.
    An interrupted study resumes where it stopped (finished runs and evaluations are kept)."""

    output_dir: str = "runs/study"
    """Report folder (report.md, study.json, plots, grids) with one run folder per model and seed."""
    base_dir: str | None = None
    """Where the pretrained base is cached (default ~/.cache/soar_fast/<recipe hash>, or $SOAR_FAST_CACHE)."""
    reuse_base: bool = True
    """Reuse a cached base with the same pretraining config instead of training it again."""
    pretrain_steps: int | None = None
    """Override the pretraining steps of the digits-pretrain recipe."""
    post_train_steps: int | None = None
    """Override the SFT and SOAR steps (equal for both) of the digits-sft/-soar recipes."""
    num_seeds: int = 3
    """K: post-training runs per model, with seeds seed .. seed + K - 1 (data order, draws, eval noise)."""
    seed: int = 0
    """The first seed."""
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.5)
    """CFG scales every final model is evaluated at (1 = conditional only; the paper samples at 4.5)."""
    eval_every: int = 75
    """Evaluate SFT and SOAR every N post-training steps too (metric vs steps); 0 = the final step only."""
    curve_guidance_scales: tuple[float, ...] = (1.0,)
    """The CFG scales of those intermediate evaluations."""
    num_samples: int = 250
    """Generated images per evaluation (accuracy, Frechet distance, precision / recall / coverage)."""
    num_inference_steps: int = 40
    """Euler steps of evaluation (40: one step is exactly the one-step rollout SOAR trains on)."""
    exposure_samples: int = 100
    """Real digits whose trajectories probe exposure bias per sigma (0 skips it)."""
    exposure_sigmas: int = 10
    """How many sigmas of the sampler grid exposure bias is measured at."""
    exposure_guidance_scale: float = 4.5
    """CFG scale of the sampler steps of the exposure-bias probe (the rollout's, 4.5)."""
    num_aux: tuple[int, ...] = (2,)
    """SOAR's auxiliary points M; more values run an ablation (e.g. 2 4 6; M = 0 is SFT, always run)."""
    lambda_aux: tuple[float, ...] = (1.0,)
    """SOAR's auxiliary weight lambda; more values run an ablation at the first M (e.g. 1 0.5 2)."""
    report_only: bool = False
    """Write report.md, study.json and the plots again from the evaluations already in output_dir
    (rows.jsonl); trains and samples nothing."""
    progress_bar: bool = True
    """Show tqdm bars."""
    num_threads: int = 0
    """torch intra-op threads for every phase (0: torch's default, one per core)."""

    def __post_init__(self) -> None:
        for name in ("guidance_scales", "curve_guidance_scales", "num_aux", "lambda_aux"):
            v = getattr(self, name)
            if isinstance(v, list):
                setattr(self, name, tuple(v))
        for g in (*self.guidance_scales, *self.curve_guidance_scales, self.exposure_guidance_scale):
            _check_sampling(self.num_samples, self.num_inference_steps, g, self.seed)
        if not self.guidance_scales:
            _fail("guidance_scales", self.guidance_scales, "need at least one scale, e.g. 1 2 3 4.5")
        if not _int(self.num_seeds, 1):
            _fail("num_seeds", self.num_seeds, "need an integer >= 1 (3 gives error bars)")
        for name in ("num_threads", "eval_every", "exposure_samples"):
            if not _int(getattr(self, name), 0):
                _fail(name, getattr(self, name), "need an integer >= 0")
        if not _int(self.exposure_sigmas, 1):
            _fail("exposure_sigmas", self.exposure_sigmas, "need an integer >= 1")
        if not self.num_aux or not all(_int(m, 1) for m in self.num_aux):
            _fail("num_aux", self.num_aux, "need SOAR's M values >= 1, e.g. 2 (or 2 4 6 for an ablation)")
        if not self.lambda_aux or not all(_num(x, 0, lo_open=True) for x in self.lambda_aux):
            _fail("lambda_aux", self.lambda_aux, "need weights > 0, e.g. 1 (or 1 0.5 2 for an ablation)")
        for name in ("pretrain_steps", "post_train_steps"):
            v = getattr(self, name)
            if v is not None and not _int(v, 1):
                _fail(name, v, "need an integer >= 1 or None (the recipe's)")


@dataclass(kw_only=True)
class DemoConfig(StudyConfig):
    """`soar-fast demo`: the study at one seed: pretrain (or reuse) a digits base on the noisy "web"
    digits, post-train it on the curated real digits with SFT and with SOAR at equal iterations and
    seeds, evaluate base, SFT and SOAR without guidance (exposure bias with the rollout's CFG 4.5
    sampler), and write a report folder
    (`soar-fast study` repeats it over seeds for error bars)."""

    output_dir: str = "runs/demo"
    """Report folder (report.md, plots, grids) with the sft/ and soar/ runs."""
    num_seeds: int = 1
    """K post-training runs per model (the demo: one; `soar-fast study` runs three)."""
    guidance_scales: tuple[float, ...] = (1.0,)
    """CFG scales of evaluation (1: no metric saturates here; at 2 and above the post-trained models
    reach accuracy 1.000, see `soar-fast study`). Exposure bias is probed at exposure_guidance_scale."""
    eval_every: int = 0
    """Intermediate evaluations every N steps (0: final models only)."""


def _check_sampling(num_samples: object, steps: object, scale: object, seed: object) -> None:
    if not _int(num_samples, 1):
        _fail("num_samples", num_samples, "need an integer >= 1 (e.g. --num_samples 100)")
    if not _int(steps, 1):
        _fail("num_inference_steps", steps, "need an integer >= 1 (the paper uses 40)")
    if not _num(scale, 0):
        _fail("guidance_scale", scale, "need a number >= 0 (1 = no guidance; the paper uses 4.5)")
    if not _int(seed, 0):
        _fail("seed", seed, "need an integer >= 0")
