"""Recipes: named starting points of a `TrainConfig`, as plain Python functions.

`soar-fast train --recipe digits-soar --learning_rate 1e-4` starts from `digits_soar()` and applies
the flags on top. Choices the paper leaves open for this small CPU setting (model size, batch,
steps, learning rate, num_aux) are documented in docs/trainer.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from soar_fast.config.errors import ConfigError
from soar_fast.config.soar import SoarConfig
from soar_fast.config.train import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrainConfig,
)

__all__ = ["RECIPES", "RECIPE_REQUIRES", "check_recipe_requirements", "get_recipe", "recipe_names"]

#: Where `digits-pretrain` writes its base and `digits-sft` / `digits-soar` read it by default.
DIGITS_BASE_DIR = "runs/digits-pretrain"
#: Post-training steps of digits-sft and digits-soar (equal iterations, the paper's comparison).
DIGITS_POST_STEPS = 300
#: The pretraining set of the digits base, a miniature of web-scale data: a fixed copy of the digits
#: with this fraction of labels replaced by another class (captions that miss) and Gaussian pixel
#: noise of this std (lower image quality); post-training then uses the clean ("curated") digits.
DIGITS_WEB_LABEL_NOISE = 0.3
DIGITS_WEB_PIXEL_NOISE = 0.3
#: Auxiliary points of the demo's SOAR (paper: 6). Fewer keep the demo within its CPU budget.
DIGITS_NUM_AUX = 2


def digits_pretrain() -> TrainConfig:
    """SFT from scratch on a noisy "web" copy of the digits (30% of labels wrong, pixel noise 0.3):
    the good but imperfect base that post-training on the curated real digits starts from.
    10% conditioning dropout makes the base usable with classifier-free guidance."""
    return TrainConfig(
        recipe="digits-pretrain",
        model=ModelConfig(preset="digits"),
        data=DataConfig(source="digits", label_noise=DIGITS_WEB_LABEL_NOISE, pixel_noise=DIGITS_WEB_PIXEL_NOISE),
        optim=OptimConfig(learning_rate=1e-3, lr_warmup_steps=100, train_batch_size=64, max_train_steps=600,
                          adam_weight_decay=1e-2, max_grad_norm=1.0),
        soar=SoarConfig(num_aux=0, cond_dropout=0.1),
        checkpoint=CheckpointConfig(checkpointing_steps=200, checkpoints_total_limit=2),
        logging=LoggingConfig(logging_steps=10, validation_steps=0),
        runtime=RuntimeConfig(output_dir=DIGITS_BASE_DIR, seed=0),
    )


def _digits_post(name: str, num_aux: int) -> TrainConfig:
    return TrainConfig(
        recipe=name,
        model=ModelConfig(pretrained_model_name_or_path=f"{DIGITS_BASE_DIR}/final", subfolder="transformer"),
        data=DataConfig(source="digits"),
        optim=OptimConfig(learning_rate=2e-4, lr_warmup_steps=0, train_batch_size=64,
                          max_train_steps=DIGITS_POST_STEPS, adam_weight_decay=1e-2, max_grad_norm=1.0),
        soar=SoarConfig(num_aux=num_aux, rollout_steps=40, guidance_scale=4.5, cond_dropout=0.1),
        checkpoint=CheckpointConfig(checkpointing_steps=0, checkpoints_total_limit=1),
        logging=LoggingConfig(logging_steps=5, validation_steps=0),
        runtime=RuntimeConfig(output_dir=f"runs/{name}", seed=0),
    )


def digits_sft() -> TrainConfig:
    """Post-train the digits base with plain SFT (num_aux=0) for DIGITS_POST_STEPS steps."""
    return _digits_post("digits-sft", 0)


def digits_soar() -> TrainConfig:
    """Post-train the digits base with SOAR for the same steps, seeds and data order as digits-sft."""
    return _digits_post("digits-soar", DIGITS_NUM_AUX)


def tiny() -> TrainConfig:
    """A seconds-long smoke run: a 1-block digits model, 4 steps, SOAR with 2 auxiliary points."""
    return TrainConfig(
        recipe="tiny",
        model=ModelConfig(preset="digits", num_layers=1, num_attention_heads=2, attention_head_dim=8),
        data=DataConfig(source="digits"),
        optim=OptimConfig(learning_rate=1e-3, train_batch_size=8, max_train_steps=4),
        soar=SoarConfig(num_aux=2, rollout_steps=10, cond_dropout=0.1),
        checkpoint=CheckpointConfig(checkpointing_steps=2, checkpoints_total_limit=2),
        logging=LoggingConfig(logging_steps=1, validation_steps=0, validation_images_per_class=1,
                              validation_inference_steps=4, progress_bar=False),
        runtime=RuntimeConfig(output_dir="runs/tiny", seed=0),
    )


#: Families with a `tiny-<family>` recipe (soar_fast.models.spec: each has a "tiny" preset).
TINY_FAMILIES = ("sd3", "flux", "flux2", "qwenimage", "zimage", "wan")
#: Latent frames of a video family's tiny recipe (Wan patches (1, 2, 2): 2 frames of 8x8 = 32 tokens).
_TINY_FRAMES = {"wan": 2}


def tiny_family(family: str) -> Callable[[], TrainConfig]:
    """`tiny-<family>`: the family's tiny real-architecture preset on synthetic latents and text
    embeddings (sizes from the model; video latents `[C, 2, 8, 8]` for wan), SOAR with 2 auxiliary
    points, 4 steps: seconds on a CPU."""

    def make() -> TrainConfig:
        return TrainConfig(
            recipe=f"tiny-{family}",
            model=ModelConfig(family=family, preset="tiny"),
            data=DataConfig(source="synthetic", latent_size=8, latent_frames=_TINY_FRAMES.get(family, 0),
                            prompt_tokens=5, num_samples=16),
            optim=OptimConfig(learning_rate=1e-3, train_batch_size=2, max_train_steps=4),
            soar=SoarConfig(num_aux=2, rollout_steps=10, cond_dropout=0.1),
            checkpoint=CheckpointConfig(checkpointing_steps=2, checkpoints_total_limit=2),
            logging=LoggingConfig(logging_steps=1, validation_steps=0, validation_images_per_class=0,
                                  progress_bar=False),
            runtime=RuntimeConfig(output_dir=f"runs/tiny-{family}", seed=0),
        )

    make.__doc__ = f"The tiny {family} preset on synthetic latents, SOAR (M = 2), 4 steps: seconds on a CPU."
    return make


def sd35m_soar() -> TrainConfig:
    """SOAR on SD3.5-Medium (SOAR.md reference run); needs --pretrained_model_name_or_path and --data.data_dir.

    Full fine-tune of the transformer from `<pretrained_model_name_or_path>/transformer` on a latent
    cache of `soar-fast cache`: AdamW lr 2e-5 constant, betas (0.9, 0.999), wd 1e-2, clip 1.0, bf16,
    no EMA, 10k steps, SOAR M=6, N=40, g=4.5. The global batch of 32 is reached on one GPU as
    train_batch_size 2 x gradient_accumulation_steps 16 (with more GPUs, divide the accumulation):
    at 2 the (1+M)*2 = 14-sample pass fits an 80 GB H100 beside the 33 GiB of fp32 weights, grads
    and AdamW state; 4 would not (docs/sd35.md "Sizes and memory", estimated from H200 peaks).
    """
    from soar_fast.config.sd35 import sd35m_soar_recipe

    r = sd35m_soar_recipe()
    micro = 2
    data = DataConfig()
    data.source = "latents"  # data_dir is required: tyro rebuilds DataConfig and its check names the flag
    return TrainConfig(
        recipe=r["name"],
        model=ModelConfig(preset="sd35-medium", pretrained_model_name_or_path=None, subfolder="transformer"),
        data=data,
        optim=OptimConfig(learning_rate=r["learning_rate"], lr_warmup_steps=r["lr_warmup_steps"],
                          adam_beta1=r["adam_beta1"], adam_beta2=r["adam_beta2"],
                          adam_weight_decay=r["adam_weight_decay"], adam_epsilon=r["adam_epsilon"],
                          max_grad_norm=r["max_grad_norm"], train_batch_size=micro,
                          gradient_accumulation_steps=r["global_batch_size"] // micro,
                          max_train_steps=r["max_train_steps"], use_ema=r["use_ema"]),
        soar=SoarConfig(**r["soar"]),
        checkpoint=CheckpointConfig(checkpointing_steps=500, checkpoints_total_limit=3),
        logging=LoggingConfig(logging_steps=10, validation_steps=0,
                              validation_inference_steps=r["validation"]["num_inference_steps"],
                              validation_guidance_scale=r["validation"]["guidance_scale"]),
        runtime=RuntimeConfig(output_dir="runs/sd35m-soar", seed=0, mixed_precision=r["mixed_precision"],
                              device="cuda"),
    )


@dataclasses.dataclass(frozen=True)
class FamilyRecipe:
    """A real SOAR recipe of a family: its checkpoint's preset (what `soar-fast plan` measures
    without weights), LoRA rank (0 = full fine-tune), the rollout's guidance and the scheduler shift."""

    name: str
    family: str
    preset: str
    checkpoint: str
    lora_rank: int
    guidance_scale: float
    shift: float
    why: str
    reference: bool = False
    """FLUX.1 Kontext: its caches carry the input images' latents (the planner assumes them without a cache)."""


#: One real recipe per family, two for Wan and FLUX.2 (dev, klein), FLUX.1 Kontext beside FLUX.1-dev (SOAR
#: defaults of SOAR.md: M = 6, N = 40, λ = 1, global batch 32, constant LR, bf16 compute). Models above ~3B
#: parameters default to LoRA (rank 64, lr 1e-4, the habit of flow_grpo and diffusers' Flux/SD3.5-L scripts):
#: their fp32 weights + AdamW states alone exceed one 80 GB GPU. Per-GPU batch splits: docs/families.md "Real recipes" (`soar-fast plan`).
FAMILY_RECIPES: tuple[FamilyRecipe, ...] = (
    FamilyRecipe("sd35l-soar", "sd3", "sd35-large", "stabilityai/stable-diffusion-3.5-large", 64, 3.5, 3.0,
                 "CFG 3.5 is SD3.5-Large's pipeline default (Medium: 4.5); shift 3.0 its scheduler's"),
    FamilyRecipe("flux-dev-soar", "flux", "flux1-dev", "black-forest-labs/FLUX.1-dev", 64, 3.5, 3.0,
                 "distilled rollout with 3.5 in the guidance embedding (FluxPipeline's default); shift 3.0 "
                 "≈ its dynamic shift at 1024 px (e^1.15 = 3.16; 1.9 at 512 px)"),
    FamilyRecipe("flux-kontext-dev-soar", "flux", "flux1-dev", "black-forest-labs/FLUX.1-Kontext-dev", 64, 3.5, 3.0,
                 "image editing: a FluxKontextPipeline folder and a cache made with --reference_root; distilled "
                 "rollout with 3.5 in the guidance embedding (FluxKontextPipeline's default), the input image's "
                 "tokens in every model call", reference=True),
    FamilyRecipe("flux2-dev-soar", "flux2", "flux2-dev", "black-forest-labs/FLUX.2-dev", 64, 4.0, 3.0,
                 "distilled rollout with 4.0 in the guidance embedding (Flux2Pipeline's default)"),
    FamilyRecipe("flux2-klein-4b-soar", "flux2", "flux2-klein-4b", "black-forest-labs/FLUX.2-klein-4B", 64, 4.0, 3.0,
                 "true CFG 4.0 (Flux2KleinPipeline's guidance_scale default; klein has no guidance embedding), "
                 "a Flux2KleinPipeline folder and its cache"),
    FamilyRecipe("qwenimage-soar", "qwenimage", "qwen-image", "Qwen/Qwen-Image", 64, 4.0, 3.0,
                 "true CFG 4.0 (QwenImagePipeline's true_cfg_scale default)"),
    FamilyRecipe("zimage-soar", "zimage", "z-image", "Tongyi-MAI/Z-Image", 64, 4.5, 3.0,
                 "true CFG at SOAR's 4.5 (the pipeline's guidance_scale g is SOAR's g + 1)"),
    FamilyRecipe("wan21-1.3b-soar", "wan", "wan2.1-t2v-1.3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 0, 5.0, 3.0,
                 "full fine-tune (1.4B parameters); CFG 5.0 (WanPipeline's default) and shift 3.0 (its "
                 "scheduler's flow_shift, the 480p setting); a cache of clips (`soar-fast cache --num_frames 81`)"),
    FamilyRecipe("wan21-14b-soar", "wan", "wan2.1-t2v-14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 64, 5.0, 3.0,
                 "CFG 5.0 and shift 3.0 as wan21-1.3b-soar; a Wan 2.2 A14B folder (two experts of this config) "
                 "trains with the same flags, both experts by default (`--model.train_experts`)"),
)


def family_recipe(spec: FamilyRecipe, micro: int = 1) -> Callable[[], TrainConfig]:
    def make() -> TrainConfig:
        data = DataConfig()
        data.source = "latents"
        lora = spec.lora_rank > 0
        return TrainConfig(
            recipe=spec.name,
            model=ModelConfig(family=spec.family, preset=spec.preset, pretrained_model_name_or_path=None,
                              subfolder="transformer", lora_rank=spec.lora_rank),
            data=data,
            optim=OptimConfig(learning_rate=1e-4 if lora else 2e-5, lr_warmup_steps=0, adam_weight_decay=1e-2,
                              max_grad_norm=1.0, train_batch_size=micro, gradient_accumulation_steps=32 // micro,
                              max_train_steps=10_000, use_ema=False),
            soar=SoarConfig(num_aux=6, rollout_steps=40, guidance_scale=spec.guidance_scale, lambda_aux=1.0,
                            shift=spec.shift),
            checkpoint=CheckpointConfig(checkpointing_steps=500, checkpoints_total_limit=3),
            logging=LoggingConfig(logging_steps=10, validation_steps=0, validation_inference_steps=40,
                                  validation_guidance_scale=spec.guidance_scale),
            runtime=RuntimeConfig(output_dir=f"runs/{spec.name}", seed=0, mixed_precision="bf16", device="cuda"),
        )

    make.__doc__ = (f"SOAR on {spec.checkpoint} ({f'LoRA rank {spec.lora_rank}' if spec.lora_rank else 'full'}); "
                    f"needs --pretrained_model_name_or_path and --data.data_dir. {spec.why}.")
    return make


#: Fields a recipe cannot default (machine-specific paths): `check_recipe_requirements` names them
#: for `soar-fast train`; `soar-fast plan` measures the recipe's preset without them.
RECIPE_REQUIRES: dict[str, tuple[tuple[str, str], ...]] = {
    "sd35m-soar": (("model.pretrained_model_name_or_path", "--pretrained_model_name_or_path <SD3.5 pipeline folder>"),
                   ("data.data_dir", "--data.data_dir <cache folder of `soar-fast cache`>")),
    **{r.name: (("model.pretrained_model_name_or_path", f"--pretrained_model_name_or_path <{r.checkpoint} folder>"),
                ("data.data_dir", "--data.data_dir <cache folder of `soar-fast cache`>")) for r in FAMILY_RECIPES},
}


def check_recipe_requirements(cfg: TrainConfig) -> None:
    """One-line ConfigError when a field the recipe of `cfg` requires is unset."""
    for dotted, flag in RECIPE_REQUIRES.get(cfg.recipe, ()):
        obj = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        if not obj:
            raise ConfigError(f"recipe {cfg.recipe!r} needs {flag}")


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "digits-pretrain": digits_pretrain,
    "digits-sft": digits_sft,
    "digits-soar": digits_soar,
    "tiny": tiny,
    "sd35m-soar": sd35m_soar,
    **{f"tiny-{f}": tiny_family(f) for f in TINY_FAMILIES},
    **{r.name: family_recipe(r) for r in FAMILY_RECIPES},
}


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> TrainConfig:
    """A fresh `TrainConfig` of the named recipe; a one-line ConfigError for an unknown name."""
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown recipe {name!r}: {hint}choose one of {', '.join(recipe_names())}")
    return dataclasses.replace(RECIPES[name]())
