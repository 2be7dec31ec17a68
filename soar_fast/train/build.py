"""The model of a `ModelConfig`: a local diffusers folder (its family read from config.json) or a
random-init preset of `model.family`, with LoRA adapters when `model.lora_rank >= 1`. A Wan 2.2
pipeline folder with two experts (`transformer/`, `transformer_2/`, model_index.json
`boundary_ratio`) gives a `WanExperts` of both (`model.train_experts` picks which learn; LoRA goes
on the learning ones) and the experts' family spec, which routes every model call by σ."""

from __future__ import annotations

import os
import re
from typing import Any

from torch import nn

from soar_fast.config import ConfigError, ModelConfig
from soar_fast.models.spec import ModelFamily, family_of_folder, get_family
from soar_fast.models.wan import WanExperts, experts_family

__all__ = ["build_model"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def build_model(cfg: ModelConfig, device: str | None = None) -> tuple[ModelFamily, nn.Module]:
    """(family, transformer) of `cfg`; with `cfg.lora_rank >= 1` the base is frozen and only the
    LoRA adapters train. `device`: where a random-init preset is built (a folder loads on the CPU)."""
    family, model = _build_base_model(cfg, device)
    return family, _with_lora(model, cfg, family)


def _with_lora(model: nn.Module, cfg: ModelConfig, family: ModelFamily) -> nn.Module:
    if not cfg.lora_rank:
        return model
    from soar_fast.models.lora import LoraSettings, apply_lora

    settings = LoraSettings(rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                            target_modules=tuple(cfg.lora_target_modules or family.lora_targets))
    if isinstance(model, WanExperts):  # adapters on the learning experts only
        for name in ("high", "low"):
            if model.train_experts in ("both", name):
                apply_lora(getattr(model, name), settings)
        return model
    return apply_lora(model, settings)


def _build_base_model(cfg: ModelConfig, device: str | None = None) -> tuple[ModelFamily, nn.Module]:
    path = cfg.pretrained_model_name_or_path
    if path is not None:
        local = os.path.expanduser(path)
        if cfg.subfolder == "transformer" and WanExperts.is_folder(local):  # Wan 2.2: both experts
            try:
                return experts_family(), WanExperts.from_pretrained(local, train=cfg.train_experts)
            except Exception as e:  # noqa: BLE001 - one line for the user
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"cannot load the two Wan 2.2 experts from {path!r} ({first}); pass a WanPipeline "
                                  "folder with transformer/ and transformer_2/") from None
        return _from_folder(path, cfg.subfolder)
    family = get_family(cfg.family)
    if cfg.preset not in family.presets:
        raise ConfigError(f"model.preset={cfg.preset!r} is invalid for model.family={cfg.family!r}: choose one of "
                          f"{', '.join(family.presets)}")
    overrides: dict[str, Any] = {}
    for name in ("num_layers", "num_attention_heads", "attention_head_dim"):
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    if family.name == "sd3" and ("num_attention_heads" in overrides or "attention_head_dim" in overrides):
        base = family.presets[cfg.preset]
        heads = overrides.get("num_attention_heads", base["num_attention_heads"])
        overrides["caption_projection_dim"] = heads * overrides.get("attention_head_dim", base["attention_head_dim"])
    import inspect

    accepted = inspect.signature(family.cls().__init__).parameters
    for name in overrides:
        if name not in accepted:
            raise ConfigError(f"--model.{name} does not apply to {family.transformer_class} (model.family="
                              f"{family.name!r}); leave it unset or pick another --model.preset")
    base = family.presets[cfg.preset]
    if "axes_dims_rope" in base:  # Flux-style rotary embeddings split the head dim over the position axes
        head, axes = overrides.get("attention_head_dim", base["attention_head_dim"]), tuple(base["axes_dims_rope"])
        if sum(axes) != head:
            raise ConfigError(f"model.attention_head_dim={head} does not fit the {cfg.family} preset {cfg.preset!r}: "
                              f"its rotary axes {axes} need a head dim of {sum(axes)}; pass --model.attention_head_dim "
                              f"{sum(axes)} (or leave it unset)")
    return family, family.build(cfg.preset, seed=cfg.init_seed, device=device, **overrides)


def _from_folder(path: str, subfolder: str) -> tuple[ModelFamily, nn.Module]:
    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        hint = "" if _HUB_ID.match(path) and not path.startswith((".", "/", "~")) else \
            "train a base first (soar-fast train --recipe digits-pretrain) or "
        raise ConfigError(f"model folder {path!r} does not exist (soar_fast reads local folders only); {hint}"
                          "pass --pretrained_model_name_or_path <a local diffusers folder>")
    if subfolder and not os.path.isdir(os.path.join(local, subfolder)):
        raise ConfigError(f"model folder {path!r} has no '{subfolder}' subfolder; pass --model.subfolder ''"
                          f" or a diffusers pipeline/run folder")
    family = family_of_folder(local, subfolder)
    try:
        return family, family.from_pretrained(local, subfolder=subfolder or None)
    except Exception as e:  # noqa: BLE001 - one line for the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot load a transformer from {path!r} ({first}); pass a diffusers model folder") from None
