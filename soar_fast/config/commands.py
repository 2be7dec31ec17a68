"""The configs of the `sample`, `eval` and `demo` commands (kw-only dataclasses, one-line checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from soar_fast.config.train import _fail, _flat, _int, _num

__all__ = ["DemoConfig", "EvalConfig", "SampleConfig"]


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
class DemoConfig:
    """`soar-fast demo`: pretrain (or reuse) a digits base, post-train it with SFT and with SOAR at
    equal iterations and seeds, evaluate base, SFT and SOAR, and write a report folder."""

    output_dir: Annotated[str, _flat("output_dir")] = "runs/demo"
    """Report folder (report.md, plots, grids) with the sft/ and soar/ runs."""
    base_dir: str | None = None
    """Where the pretrained base is cached (default ~/.cache/soar_fast/<recipe hash>, or $SOAR_FAST_CACHE)."""
    reuse_base: bool = True
    """Reuse a cached base with the same pretraining config instead of training it again."""
    pretrain_steps: int | None = None
    """Override the pretraining steps of the digits-pretrain recipe."""
    post_train_steps: int | None = None
    """Override the SFT and SOAR steps (equal for both) of the digits-sft/-soar recipes."""
    num_samples: Annotated[int, _flat("num_samples")] = 500
    """Generated images per model for accuracy and Frechet distance."""
    guidance_scale: Annotated[float, _flat("guidance_scale")] = 4.5
    """CFG scale of evaluation."""
    num_inference_steps: Annotated[int, _flat("num_inference_steps")] = 40
    """Euler steps of evaluation."""
    seed: Annotated[int, _flat("seed")] = 0
    """Seed of both post-training runs (equal seeds) and of evaluation."""
    progress_bar: bool = True
    """Show tqdm bars."""
    num_threads: int = 0
    """torch intra-op threads for every phase (0: torch's default, one per core)."""

    def __post_init__(self) -> None:
        _check_sampling(self.num_samples, self.num_inference_steps, self.guidance_scale, self.seed)
        if not _int(self.num_threads, 0):
            _fail("num_threads", self.num_threads, "need an integer >= 0 (0: one per core)")
        for name in ("pretrain_steps", "post_train_steps"):
            v = getattr(self, name)
            if v is not None and not _int(v, 1):
                _fail(name, v, "need an integer >= 1 or None (the recipe's)")


def _check_sampling(num_samples: object, steps: object, scale: object, seed: object) -> None:
    if not _int(num_samples, 1):
        _fail("num_samples", num_samples, "need an integer >= 1 (e.g. --num_samples 100)")
    if not _int(steps, 1):
        _fail("num_inference_steps", steps, "need an integer >= 1 (the paper uses 40)")
    if not _num(scale, 0):
        _fail("guidance_scale", scale, "need a number >= 0 (1 = no guidance; the paper uses 4.5)")
    if not _int(seed, 0):
        _fail("seed", seed, "need an integer >= 0")
