"""The SD3.5 path's plain settings: the `sd35m-soar` recipe and the pipeline-folder checks.

Stdlib only (the config room imports nothing else of soar_fast): the trainer maps the recipe dict
into its own config, and both `data.cache` and `models.pipeline` use `check_pipeline_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "FLUX2_PIPELINES",
    "FLUX_PIPELINES",
    "KLEIN_PIPELINE",
    "KONTEXT_PIPELINE",
    "OWN_CLASS_PIPELINES",
    "PIPELINE_FAMILIES",
    "QWENIMAGE_PIPELINES",
    "WAN_PIPELINES",
    "ZIMAGE_PIPELINES",
    "NotAPipelineError",
    "SD3_PIPELINES",
    "check_pipeline_folder",
    "pipeline_family",
    "sd35m_soar_recipe",
]

SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
#: FLUX.1 Kontext: image editing; its caches carry reference latents and its samples an input image.
KONTEXT_PIPELINE = "FluxKontextPipeline"
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", KONTEXT_PIPELINE)
ZIMAGE_PIPELINES = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
QWENIMAGE_PIPELINES = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
#: FLUX.2 [klein]: a Qwen3 text encoder and true CFG (no guidance embedding) instead of dev's Mistral-3.
KLEIN_PIPELINE = "Flux2KleinPipeline"
FLUX2_PIPELINES = ("Flux2Pipeline", KLEIN_PIPELINE)
WAN_PIPELINES = ("WanPipeline",)
#: The pipeline classes `soar-fast cache` / `sample --pipeline` take, by family (soar_fast.models.spec names).
PIPELINE_FAMILIES: dict[str, tuple[str, ...]] = {
    "sd3": SD3_PIPELINES, "flux": FLUX_PIPELINES, "zimage": ZIMAGE_PIPELINES, "qwenimage": QWENIMAGE_PIPELINES,
    "flux2": FLUX2_PIPELINES, "wan": WAN_PIPELINES,
}


class NotAPipelineError(ValueError):
    """A model folder that is not a diffusers pipeline of the expected family."""


def sd35m_soar_recipe() -> dict[str, Any]:
    """Reference hyperparameters of SOAR on SD3.5-Medium (../shared/SOAR.md), as a plain dict.

    Keys use diffusers flag names where one exists. `soar` holds `SoarConfig` fields.
    """
    return {
        "name": "sd35m-soar",
        "pretrained_model_name_or_path": "stabilityai/stable-diffusion-3.5-medium",
        "finetune": "full",  # the transformer; VAE and text encoders frozen
        "optimizer": "adamw",
        "learning_rate": 2e-5,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 1e-2,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "global_batch_size": 32,
        "resolution": 512,
        "mixed_precision": "bf16",
        "use_ema": False,
        "max_train_steps": 10_000,
        "max_sequence_length": 256,
        "soar": {
            "num_aux": 6,
            "rollout_steps": 40,
            "guidance_scale": 4.5,
            "lambda_aux": 1.0,
            "shift": 3.0,
            "weighting": "logit_normal",
            "normalization": "points",
        },
        "validation": {"num_inference_steps": 40, "guidance_scale": 4.5},
    }


def check_pipeline_folder(path: str | Path, expect: tuple[str, ...] = SD3_PIPELINES) -> str:
    """The `_class_name` of a local diffusers pipeline folder; `NotAPipelineError` (naming the
    folder, what it holds and what is expected) if it is missing or of another family."""
    p = Path(path)
    want = " or ".join(expect)
    if not p.is_dir():
        raise NotAPipelineError(f"{p} is not a folder; pass a local diffusers {want} folder (with model_index.json)")
    index = p / "model_index.json"
    if not index.is_file():
        hint = ""
        if (p / "config.json").is_file():
            hint = " (it looks like a single model folder; pass the pipeline folder above it)"
        raise NotAPipelineError(f"{p} has no model_index.json{hint}: not a diffusers pipeline; need a {want} folder")
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except json.JSONDecodeError as e:
        raise NotAPipelineError(f"{index} is not valid JSON ({e.msg})") from None
    if name not in expect:
        raise NotAPipelineError(f"{p} holds a {name} (model_index.json), not a {want}; use a matching checkpoint")
    return name


def pipeline_class_name(path: str | Path) -> str:
    """The `_class_name` of a local pipeline folder of any supported family (`NotAPipelineError` otherwise)."""
    return check_pipeline_folder(path, tuple(n for names in PIPELINE_FAMILIES.values() for n in names))


#: Folders of these classes load as themselves (a variant that encodes or samples differently); any other folder
#: of a family (Img2Img, Inpaint, ...) loads as the family's text-to-image pipeline (`ModelFamily.pipeline_class`).
OWN_CLASS_PIPELINES = (KONTEXT_PIPELINE, KLEIN_PIPELINE)


def pipeline_load_class(path: str | Path) -> str | None:
    """The diffusers class name to load the folder with when it is not its family's text-to-image one."""
    name = pipeline_class_name(path)
    return name if name in OWN_CLASS_PIPELINES else None


def pipeline_family(path: str | Path) -> str:
    """The family ('sd3', 'flux', 'zimage', 'qwenimage', 'flux2' or 'wan') of a local pipeline folder of any
    of them (from its model_index.json `_class_name`); `NotAPipelineError` otherwise."""
    name = pipeline_class_name(path)
    return next(fam for fam, names in PIPELINE_FAMILIES.items() if name in names)
