"""Local pipeline folders of every family (SD3 / SD3.5, FLUX.1, Z-Image, Qwen-Image, FLUX.2, Wan video):
load the pipeline or its transformer, export (`soar_fast.models.sampling` samples them).

- `load_sd3_transformer(path)` / `load_transformer(path)`: the transformer (`SD3Transformer2DModel`,
  `FluxTransformer2DModel`, ...: the family's class) of a local pipeline folder.
- `export_transformer(transformer, out, base=...)`: `save_pretrained` of the trained transformer,
  either alone (`out/transformer`) or as a complete pipeline folder (the other components copied
  from `base`), so the family's pipeline (`StableDiffusion3Pipeline.from_pretrained(out)`, ...) loads it.
- `load_pipeline(path, transformer_path=..., lora_path=...)`: the folder's pipeline with a trained model.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from soar_fast.config import ConfigError
from soar_fast.config.sd35 import (
    SD3_PIPELINES,
    check_pipeline_folder,
    pipeline_family,
)
from soar_fast.models.lora import lora_family
from soar_fast.models.spec import get_family

__all__ = ["copy_pipeline_components", "export_transformer", "load_pipeline", "load_sd3_transformer", "load_transformer"]

log = logging.getLogger(__name__)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)




def load_transformer(
    pretrained_model_name_or_path: str | Path, *, torch_dtype: torch.dtype = torch.float32, variant: str | None = None
) -> nn.Module:
    """The transformer of a local pipeline folder of any supported family (local files only).

    Raises `NotAPipelineError` for any other folder.
    """
    family = pipeline_family(pretrained_model_name_or_path)
    return get_family(family).cls().from_pretrained(
        pretrained_model_name_or_path, subfolder="transformer", torch_dtype=torch_dtype, variant=variant,
        local_files_only=True,
    )


def load_sd3_transformer(
    pretrained_model_name_or_path: str | Path, *, torch_dtype: torch.dtype = torch.float32, variant: str | None = None
) -> nn.Module:
    """`SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")`, local files only.

    Raises `NotAPipelineError` when `path` is not a StableDiffusion3Pipeline folder.
    """
    check_pipeline_folder(pretrained_model_name_or_path, SD3_PIPELINES)
    return load_transformer(pretrained_model_name_or_path, torch_dtype=torch_dtype, variant=variant)


def copy_pipeline_components(base: str | Path, out: str | Path, *, how: Literal["hardlink", "copy", "symlink"] = "hardlink",
                             skip: str | tuple[str, ...] = "transformer") -> bool:
    """Make `out` a pipeline folder with `base`'s components (model_index.json, VAE, text encoders,
    tokenizers, scheduler, ...) except `skip` (the trained one or ones): "hardlink" links every file (no
    extra disk, independent of `base` moving; copies where linking fails, e.g. across devices),
    "copy" copies, "symlink" links the folders to `base`. False when `base` is not a pipeline folder."""
    base, out = Path(base).expanduser(), Path(out)
    if not (base / "model_index.json").is_file():
        return False
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.name in ((skip,) if isinstance(skip, str) else skip) or item.name.startswith("."):
            continue
        if how == "symlink":
            if not (out / item.name).exists():
                (out / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
            continue
        for f in [item] if item.is_file() else [f for f in item.rglob("*") if f.is_file()]:
            target = out / f.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            if how == "hardlink":
                try:
                    os.link(f, target)
                    continue
                except OSError:
                    pass
            shutil.copy2(f, target)
    return True


def export_transformer(
    transformer: nn.Module,
    output_dir: str | Path,
    *,
    base: str | Path | None = None,
    mode: Literal["pipeline", "transformer"] = "pipeline",
    torch_dtype: torch.dtype | None = None,
    link_components: bool = False,
) -> Path:
    """Save a trained transformer with `save_pretrained` to `output_dir/transformer`.

    `mode="pipeline"` also copies every other component of the `base` pipeline folder (VAE, text
    encoders, tokenizers, scheduler, model_index.json), giving a folder that
    `StableDiffusion3Pipeline.from_pretrained(output_dir)` loads. `mode="transformer"` writes only
    the transformer subfolder (load it with `SD3Transformer2DModel.from_pretrained(out,
    subfolder="transformer")` and pass it to the pipeline). A LoRA-adapted transformer must be
    merged first (`soar_fast.models.lora.merge_lora`) or saved with `save_lora_weights`.
    `torch_dtype` casts the saved weights (e.g. bf16) without changing `transformer` itself.
    `link_components=True` symlinks the frozen components instead of copying them (no second copy
    of the ~10 GB T5; the export then depends on `base` staying in place). Returns `output_dir`.
    """
    if getattr(transformer, "_hf_peft_config_loaded", False):
        raise ValueError("transformer still has LoRA adapters: merge_lora() it first, or use save_lora_weights()")
    out = Path(output_dir)
    if mode == "pipeline":
        if base is None:
            raise ValueError("export_transformer(mode='pipeline') needs base=<the pipeline folder trained from>")
        family = pipeline_family(base)
        if type(transformer).__name__ != get_family(family).transformer_class:
            raise ValueError(f"base {base} is a {family} pipeline but the transformer is a {type(transformer).__name__}")
        base = Path(base)
        if base.resolve() == out.resolve():
            raise ValueError(f"output_dir {out} is the base folder; export to a new folder")
        copy_pipeline_components(base, out, how="symlink" if link_components else "copy")
    elif mode != "transformer":
        raise ValueError(f"mode={mode!r}: choose 'pipeline' or 'transformer'")
    handle = None
    if torch_dtype is not None:
        # Cast while saving (per tensor, on the CPU): the caller's model keeps its dtype.
        def cast(module, state_dict, prefix, local_metadata):
            for k, v in state_dict.items():
                if v.is_floating_point():
                    state_dict[k] = v.detach().to("cpu", torch_dtype)

        handle = transformer._register_state_dict_hook(cast)
    try:
        transformer.save_pretrained(out / "transformer")
    finally:
        if handle is not None:
            handle.remove()
    return out


def load_pipeline(
    pretrained_model_name_or_path: str | Path,
    *,
    transformer_path: str | Path | None = None,
    lora_path: str | Path | None = None,
    lora_scale: float = 1.0,
    device: str = "auto",
    dtype: str = "auto",
    variant: str | None = None,
):  # -> StableDiffusion3Pipeline | FluxPipeline | ZImagePipeline | QwenImagePipeline | Flux2Pipeline
    """The pipeline of a local folder of any supported family, optionally with another transformer (a folder
    holding `transformer/` or the transformer's own folder) and a LoRA folder or file."""
    family = pipeline_family(pretrained_model_name_or_path)
    dev = _device(device)
    td = _dtype(dtype, dev)
    kwargs: dict[str, Any] = {}
    if transformer_path is not None:
        tp = Path(transformer_path)
        sub = "transformer" if (tp / "transformer" / "config.json").is_file() else None
        kwargs["transformer"] = get_family(family).cls().from_pretrained(
            tp, subfolder=sub, torch_dtype=td, local_files_only=True
        )
    cls = get_family(family).pipeline_cls(pretrained_model_name_or_path)  # e.g. FluxKontextPipeline
    pipe = cls.from_pretrained(
        pretrained_model_name_or_path, local_files_only=True, torch_dtype=td, variant=variant, **kwargs
    )
    if lora_path is not None:
        _load_lora(pipe, Path(lora_path), family, pretrained_model_name_or_path, lora_scale)
    return pipe.to(dev)


def _load_lora(pipe, lp: Path, family: str, pipeline_path, lora_scale: float) -> None:
    """`load_lora_weights` of a LoRA folder or file; a Wan 2.2 export's low-noise expert adapters
    (`<folder>/transformer_2/`) go into `transformer_2` (diffusers' `load_into_transformer_2`)."""
    name = "pytorch_lora_weights.safetensors"
    folder = lp if lp.is_dir() else lp.parent
    low = folder / "transformer_2" / name if getattr(pipe, "transformer_2", None) is not None else None
    low = low if low is not None and low.is_file() else None
    if (lp / name).is_file():
        lp = lp / name
    elif not lp.is_file() and low is None:
        raise FileNotFoundError(f"no LoRA weights at {lp}: pass the folder written by save_lora_weights "
                                "or a .safetensors file")
    for path in [q for q in (lp if lp.is_file() else None, low) if q is not None]:
        trained_for = lora_family(path) if path.suffix == ".safetensors" else None
        if trained_for is not None and trained_for != family:
            raise ConfigError(f"the LoRA {path} was trained for a {trained_for} model but {pipeline_path} is a "
                              f"{family} pipeline: pass a {trained_for} pipeline folder, or a LoRA trained on this "
                              f"{family} model")
        into = {"load_into_transformer_2": True} if path == low else {}
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="soar", **into)
    if lora_scale != 1.0:
        pipe.set_adapters(["soar"], adapter_weights=[lora_scale])
