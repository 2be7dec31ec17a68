"""The trainer's typed config tree: `TrainConfig` (model, data, optim, soar, checkpoint, logging,
runtime, fast, parallel); the configs of the `sample`, `eval` and `demo` commands are in commands.py.

Each section is a kw-only dataclass with a docstring under every field (tyro turns them into
`--help`). Fields that the diffusers training scripts also have keep their names there and are
exposed without a section prefix (`--learning_rate`, `--output_dir`, ...). Every check raises a
one-line `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from soar_fast.config.errors import ConfigError
from soar_fast.config.fast import FastConfig
from soar_fast.config.parallel import ParallelConfig
from soar_fast.config.soar import SoarConfig

try:  # tyro is a dependency of the CLI; the config works without it (markers become no-ops).
    from tyro.conf import Suppress as _Suppress
    from tyro.conf import arg as _tyro_arg
except ImportError:  # pragma: no cover
    _Suppress = None

    def _tyro_arg(**_: Any) -> None:  # type: ignore[misc]
        return None

__all__ = [
    "CheckpointConfig", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig", "RuntimeConfig",
    "TrainConfig",
]


def _flat(name: str) -> Any:
    """tyro marker: expose a field as `--name` (the diffusers flag), without its section prefix."""
    return _tyro_arg(name=name, prefix_name=False)


def _fail(where: str, value: object, need: str) -> None:
    raise ConfigError(f"{where}={value!r} is invalid: {need}")


def _int(x: object, lo: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and (lo is None or x >= lo)


def _num(x: object, lo: float | None = None, lo_open: bool = False) -> bool:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return ok and (lo is None or (x > lo if lo_open else x >= lo))


def _str(x: object) -> bool:
    return isinstance(x, str) and len(x) > 0


#: The model families soar_fast.models.spec defines (each in its spec or its own module).
FAMILY_NAMES = ("sd3", "flux", "flux2", "qwenimage", "zimage", "wan")


@dataclass(kw_only=True)
class ModelConfig:
    """Which transformer to train: a random-init preset or a local diffusers folder."""

    family: str = "sd3"
    """Model family of a preset (`FAMILY_NAMES`, defined in soar_fast.models.spec); a folder's
    family is read from its config.json."""
    preset: str = "digits"
    """Architecture preset of a randomly initialised transformer of `family` (e.g. SD3_PRESETS)."""
    pretrained_model_name_or_path: Annotated[str | None, _flat("pretrained_model_name_or_path")] = None
    """A diffusers model folder (or run folder's `final/`) to start from; None = random init of `preset`."""
    subfolder: str = "transformer"
    """Subfolder of `pretrained_model_name_or_path` holding the transformer ('' for none)."""
    num_layers: int | None = None
    """Override the preset's number of MMDiT blocks."""
    num_attention_heads: int | None = None
    """Override the preset's number of attention heads."""
    attention_head_dim: int | None = None
    """Override the preset's attention head dim (the width is heads x head dim)."""
    init_seed: int = 0
    """Seed of the random initialisation (a preset only)."""
    lora_rank: int = 0
    """LoRA adapter rank; 0 = full fine-tune of the transformer, >= 1 trains only LoRA adapters
    (soar_fast.models.lora.apply_lora) and the final export is pytorch_lora_weights.safetensors."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (scale = alpha / rank); None = rank. Needs lora_rank >= 1."""
    lora_target_modules: tuple[str, ...] | None = None
    """Module-name suffixes that get adapters; None = to_q, to_k, to_v, to_out.0. Needs lora_rank >= 1."""
    train_experts: Literal["both", "high", "low"] = "both"
    """A Wan 2.2 two-expert folder (`transformer/` high noise, `transformer_2/` low noise, model_index.json
    `boundary_ratio`): which experts learn; the other is frozen but still serves its σ range in every
    model call of the step. Other models have one transformer and ignore it."""

    def __post_init__(self) -> None:
        if not _int(self.lora_rank, 0):
            _fail("model.lora_rank", self.lora_rank, "need an integer >= 0 (0 = full fine-tune, e.g. 16 for LoRA)")
        if self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_target_modules is not None):
            _fail("model.lora_rank", self.lora_rank, "LoRA settings (lora_alpha / lora_target_modules) were given "
                  "but rank 0 means full fine-tune; set --model.lora_rank >= 1 (e.g. 16) or drop them")
        if self.lora_alpha is not None and not _num(self.lora_alpha, 0, lo_open=True):
            _fail("model.lora_alpha", self.lora_alpha, "need a number > 0 or None (= rank)")
        if self.lora_target_modules is not None:
            if isinstance(self.lora_target_modules, list):
                self.lora_target_modules = tuple(self.lora_target_modules)
            if not self.lora_target_modules or not all(_str(t) for t in self.lora_target_modules):
                _fail("model.lora_target_modules", self.lora_target_modules, "need module names, e.g. to_q to_k to_v to_out.0")
        if not _str(self.preset):
            _fail("model.preset", self.preset, "name a preset, e.g. 'digits'")
        if self.family not in FAMILY_NAMES:
            _fail("model.family", self.family, f"choose one of {', '.join(FAMILY_NAMES)}")
        if self.pretrained_model_name_or_path is not None and not _str(self.pretrained_model_name_or_path):
            _fail("model.pretrained_model_name_or_path", self.pretrained_model_name_or_path, "need a folder path or None")
        if not isinstance(self.subfolder, str):
            _fail("model.subfolder", self.subfolder, "need a string ('' for none)")
        for name in ("num_layers", "num_attention_heads", "attention_head_dim"):
            v = getattr(self, name)
            if v is not None and not _int(v, 1):
                _fail(f"model.{name}", v, "need an integer >= 1 or None (keep the preset's)")
        if not _int(self.init_seed, 0):
            _fail("model.init_seed", self.init_seed, "need an integer >= 0")
        if self.train_experts not in ("both", "high", "low"):
            _fail("model.train_experts", self.train_experts, "choose both, high or low")


@dataclass(kw_only=True)
class DataConfig:
    """Where the clean latents z0 and their conditions come from."""

    source: Literal["digits", "latents", "synthetic"] = "digits"
    """'digits': sklearn's 1,797 8x8 handwritten digits, class-conditional (pixels are the latents);
    'latents': cached latent + text-embedding shards from `data_dir` (soar_fast.data.cache);
    'synthetic': random latents and embeddings of the model's sizes (benchmarks, tests)."""
    data_dir: str | None = None
    """Folder of cached latent shards (source='latents' only)."""
    resolution: int = 8
    """Digits side in pixels: 8 (as shipped) or a multiple of 8 (bilinear upsampling)."""
    prompt_tokens: int = 1
    """Tokens of each class's fixed 'prompt embedding' (the encoder_hidden_states length)."""
    embedding_seed: int = 1234
    """Seed of the fixed class prompt embeddings (and of the synthetic rows); keep it between
    pretraining and post-training."""
    latent_size: int = 8
    """Latent height and width of the synthetic source (64 is SD3.5 at 512 px)."""
    latent_frames: int = 0
    """Latent frames of the synthetic source: 0 = images `[C, S, S]`, >= 1 = video latents
    `[C, F, S, S]` (video families, e.g. wan: 21 is Wan's 81 frames). Cached latents carry their own."""
    num_samples: int = 64
    """Rows of the synthetic source."""
    label_noise: float = 0.0
    """source='digits': fraction of rows whose class label is replaced by another class (fixed per row,
    seeded by embedding_seed): the noisy captions of a web-scale pretraining set (digits-pretrain)."""
    pixel_noise: float = 0.0
    """source='digits': std of fixed Gaussian noise added to every digit (clamped to [-1, 1]): the
    lower image quality of a web-scale pretraining set. 0 = the curated real digits."""
    verify_shards: bool = True
    """source='latents': check every shard's sha256 against the cache's index.json when the run
    opens the cache (once per run, threaded, split over ranks); a shard that fails is refused.
    `--data.no-verify_shards` skips it on trusted storage (shapes and dtypes are still checked)."""
    num_workers: int | None = None
    """DataLoader worker processes per rank that read and collate batches ahead of the step (with
    pinned memory on CUDA). None: min(4, CPUs) for source='latents', 0 (read in the trainer's
    process) for the in-memory digits and synthetic sources. The batches are the same at any value."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (num_workers > 0 only)."""

    def __post_init__(self) -> None:
        if self.source not in ("digits", "latents", "synthetic"):
            _fail("data.source", self.source, "choose 'digits', 'latents' or 'synthetic'")
        for name in ("latent_size", "num_samples"):
            if not _int(getattr(self, name), 1):
                _fail(f"data.{name}", getattr(self, name), "need an integer >= 1")
        if not _int(self.latent_frames, 0):
            _fail("data.latent_frames", self.latent_frames, "need an integer >= 0 (0 = images, e.g. 2 for video)")
        if self.source == "latents" and not self.data_dir:
            _fail("data.data_dir", self.data_dir, "set --data.data_dir to a folder of cached latents")
        if not _num(self.label_noise, 0) or self.label_noise > 1:
            _fail("data.label_noise", self.label_noise, "need a fraction in [0, 1], e.g. 0.3")
        if not _num(self.pixel_noise, 0):
            _fail("data.pixel_noise", self.pixel_noise, "need a std >= 0 in [-1, 1] pixel units, e.g. 0.3")
        if (self.label_noise or self.pixel_noise) and self.source != "digits":
            _fail("data.source", self.source, "label_noise / pixel_noise corrupt the embedded digits only; "
                  "use --data.source digits or drop them")
        if not _int(self.resolution, 8) or self.resolution % 8:
            _fail("data.resolution", self.resolution, "need 8 or a multiple of 8, e.g. 16")
        if not _int(self.prompt_tokens, 1):
            _fail("data.prompt_tokens", self.prompt_tokens, "need an integer >= 1")
        if not _int(self.embedding_seed, 0):
            _fail("data.embedding_seed", self.embedding_seed, "need an integer >= 0")
        if not isinstance(self.verify_shards, bool):
            _fail("data.verify_shards", self.verify_shards, "need true or false")
        if self.num_workers is not None and not _int(self.num_workers, 0):
            _fail("data.num_workers", self.num_workers, "need an integer >= 0 (0 = read in the training process)")
        if not _int(self.prefetch_factor, 1):
            _fail("data.prefetch_factor", self.prefetch_factor, "need an integer >= 1, e.g. 2")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with a constant LR after an optional linear warm-up, clipping, accumulation, EMA."""

    learning_rate: Annotated[float, _flat("learning_rate")] = 1e-4
    """Peak (constant) learning rate."""
    lr_warmup_steps: Annotated[int, _flat("lr_warmup_steps")] = 0
    """Linear warm-up steps from 0 to `learning_rate`."""
    adam_beta1: Annotated[float, _flat("adam_beta1")] = 0.9
    """AdamW beta1."""
    adam_beta2: Annotated[float, _flat("adam_beta2")] = 0.999
    """AdamW beta2."""
    adam_weight_decay: Annotated[float, _flat("adam_weight_decay")] = 1e-2
    """AdamW decoupled weight decay."""
    adam_epsilon: Annotated[float, _flat("adam_epsilon")] = 1e-8
    """AdamW epsilon."""
    max_grad_norm: Annotated[float, _flat("max_grad_norm")] = 1.0
    """Clip the global gradient norm to this (0 disables clipping; the norm is still logged)."""
    train_batch_size: Annotated[int, _flat("train_batch_size")] = 64
    """Samples per micro-batch (SOAR adds num_aux re-noised points per sample)."""
    gradient_accumulation_steps: Annotated[int, _flat("gradient_accumulation_steps")] = 1
    """Micro-batches per optimizer step."""
    max_train_steps: Annotated[int, _flat("max_train_steps")] = 1000
    """Optimizer steps of the run (a NaN-skipped step counts)."""
    use_ema: Annotated[bool, _flat("use_ema")] = False
    """Keep an exponential moving average of the weights (saved, and used by eval when present)."""
    ema_decay: float = 0.999
    """EMA decay per optimizer step."""
    max_nan_streak: int = 20
    """Abort after this many consecutive steps with a NaN/inf loss or gradient (each is skipped)."""

    def __post_init__(self) -> None:
        if not _num(self.learning_rate, 0, lo_open=True):
            _fail("optim.learning_rate", self.learning_rate, "need a finite number > 0, e.g. 1e-4")
        for name in ("lr_warmup_steps",):
            if not _int(getattr(self, name), 0):
                _fail(f"optim.{name}", getattr(self, name), "need an integer >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not _num(v) or not 0 <= v < 1:
                _fail(f"optim.{name}", v, "need a number in [0, 1), e.g. 0.9 / 0.999")
        if not _num(self.adam_weight_decay, 0):
            _fail("optim.adam_weight_decay", self.adam_weight_decay, "need a number >= 0, e.g. 1e-2")
        if not _num(self.adam_epsilon, 0, lo_open=True):
            _fail("optim.adam_epsilon", self.adam_epsilon, "need a number > 0, e.g. 1e-8")
        if not _num(self.max_grad_norm, 0):
            _fail("optim.max_grad_norm", self.max_grad_norm, "need a number >= 0 (0 disables clipping)")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "max_nan_streak"):
            if not _int(getattr(self, name), 1):
                _fail(f"optim.{name}", getattr(self, name), "need an integer >= 1")
        if not isinstance(self.use_ema, bool):
            _fail("optim.use_ema", self.use_ema, "need true or false")
        if not _num(self.ema_decay) or not 0 <= self.ema_decay < 1:
            _fail("optim.ema_decay", self.ema_decay, "need a number in [0, 1), e.g. 0.999")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Atomic, resumable checkpoints under `<output_dir>/checkpoints/checkpoint-<step>`."""

    checkpointing_steps: Annotated[int, _flat("checkpointing_steps")] = 500
    """Save a checkpoint every this many steps (0: only at the end, see `final_checkpoint`, and on SIGTERM/SIGINT)."""
    checkpoints_total_limit: Annotated[int, _flat("checkpoints_total_limit")] = 3
    """Keep the last N checkpoints."""
    resume_from_checkpoint: Annotated[str | None, _flat("resume_from_checkpoint")] = None
    """'latest' (newest good checkpoint of output_dir) or a checkpoint folder; None starts fresh."""
    save_final_model: bool = True
    """Write the trained transformer as a diffusers folder `<output_dir>/final/transformer` (and EMA)."""
    final_checkpoint: bool = True
    """Save a checkpoint when the run reaches max_train_steps (off for timing runs of big models,
    whose checkpoint is tens of GB; SIGTERM/SIGINT and `checkpointing_steps` still save)."""

    def __post_init__(self) -> None:
        if not _int(self.checkpointing_steps, 0):
            _fail("checkpoint.checkpointing_steps", self.checkpointing_steps, "need an integer >= 0")
        if not _int(self.checkpoints_total_limit, 1):
            _fail("checkpoint.checkpoints_total_limit", self.checkpoints_total_limit, "need an integer >= 1")
        if self.resume_from_checkpoint is not None and not _str(self.resume_from_checkpoint):
            _fail("checkpoint.resume_from_checkpoint", self.resume_from_checkpoint, "use 'latest' or a checkpoint folder")


@dataclass(kw_only=True)
class LoggingConfig:
    """Progress bar, TensorBoard scalars, metrics.jsonl and periodic sample grids."""

    logging_steps: int = 10
    """Write scalars every this many steps."""
    report_to: Annotated[Literal["tensorboard", "none"], _flat("report_to")] = "tensorboard"
    """'tensorboard' (logs under <output_dir>/logs) or 'none' (metrics.jsonl only)."""
    validation_steps: Annotated[int, _flat("validation_steps")] = 0
    """Write a sample grid every this many steps and at the end (0: digits only at the end, a latent
    cache none). On a latent cache it samples the cache's validation prompts (`soar-fast cache ...
    --validation_prompts FILE`) and decodes them with the VAE of the pipeline it was cached from."""
    validation_images_per_class: int = 2
    """Rows of the sample grid (one column per class, or per validation prompt); 0: no grids."""
    validation_inference_steps: int = 40
    """Euler steps of the grid sampler."""
    validation_guidance_scale: float = 4.5
    """CFG scale of the grid sampler; with a distilled rollout (FLUX.1-dev, FLUX.2-dev) the guidance embedding's
    value instead, one conditional pass a step, as their pipelines sample."""
    progress_bar: bool = True
    """Show a tqdm bar with loss and steps/s."""

    def __post_init__(self) -> None:
        if not _int(self.logging_steps, 1):
            _fail("logging.logging_steps", self.logging_steps, "need an integer >= 1")
        if self.report_to not in ("tensorboard", "none"):
            _fail("logging.report_to", self.report_to, "choose 'tensorboard' or 'none'")
        if not _int(self.validation_steps, 0):
            _fail("logging.validation_steps", self.validation_steps, "need an integer >= 0")
        if not _int(self.validation_images_per_class, 0):
            _fail("logging.validation_images_per_class", self.validation_images_per_class, "need an integer >= 0 (0: no grids)")
        if not _int(self.validation_inference_steps, 1):
            _fail("logging.validation_inference_steps", self.validation_inference_steps, "need an integer >= 1")
        if not _num(self.validation_guidance_scale, 0):
            _fail("logging.validation_guidance_scale", self.validation_guidance_scale, "need a number >= 0")


@dataclass(kw_only=True)
class RuntimeConfig:
    """Where, how precisely and with which step implementation the run executes."""

    output_dir: Annotated[str, _flat("output_dir")] = "runs/soar"
    """Run folder: config.json, checkpoints/, logs/, samples/, metrics.jsonl, final/."""
    seed: Annotated[int, _flat("seed")] = 0
    """Seed of the data order, the SOAR draws and the global RNGs."""
    mixed_precision: Annotated[Literal["no", "bf16"], _flat("mixed_precision")] = "no"
    """Compute dtype: 'no' (fp32) or 'bf16' (FSDP2 all-gathers and computes in bf16; master
    weights and AdamW states stay in `weight_dtype`, gradients are reduced in fp32)."""
    weight_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the stored weights and AdamW states: 'fp32' master weights (the default), or
    'bf16' for pure-bf16 training (half the memory; implies bf16 compute)."""
    device: str = "cpu"
    """torch device, e.g. 'cpu' or 'cuda'."""
    step: Literal["eager", "fast"] = "eager"
    """Step implementation: 'eager' is the reference soar_loss (one pass per point), 'fast' the
    batched (1+M)B step with fused ops and the rollout engine, configured by the `fast` section."""
    num_threads: int = 0
    """torch intra-op threads (0: torch's default)."""

    def __post_init__(self) -> None:
        if not _str(self.output_dir):
            _fail("runtime.output_dir", self.output_dir, "need a folder path")
        if not _int(self.seed, 0):
            _fail("runtime.seed", self.seed, "need an integer >= 0")
        if self.mixed_precision not in ("no", "bf16"):
            _fail("runtime.mixed_precision", self.mixed_precision, "choose 'no' or 'bf16'")
        if not _str(self.device):
            _fail("runtime.device", self.device, "need a torch device such as 'cpu'")
        import torch

        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            _fail("runtime.device", self.device, "not a torch device: pass cpu, cuda or cuda:N")
        if self.step not in ("eager", "fast"):
            _fail("runtime.step", self.step, "choose 'eager' or 'fast'")
        if self.weight_dtype not in ("fp32", "bf16"):
            _fail("runtime.weight_dtype", self.weight_dtype, "choose 'fp32' or 'bf16'")
        if not _int(self.num_threads, 0):
            _fail("runtime.num_threads", self.num_threads, "need an integer >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a `soar-fast train` run needs. SFT is `--soar.num_aux 0`."""

    recipe: Annotated[str, _Suppress] = "custom"
    """Name of the recipe this config started from (informational; set by --recipe)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The transformer."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and step counts."""
    soar: SoarConfig = field(default_factory=SoarConfig)
    """The SOAR loss (SOAR.md); num_aux=0 is plain SFT through the same loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging and sample grids."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Output folder, seed, precision, device, step implementation."""
    fast: FastConfig = field(default_factory=FastConfig)
    """How the step runs: batched-step options, rollout mode, compile, FP8, checkpointing, attention."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """FSDP2 data parallelism (a plain process is a one-rank mesh)."""
