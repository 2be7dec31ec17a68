"""One spec per model family (torchtitan's TrainSpec habit): everything the trainer, the step
constructor and the benchmarks need to know about a diffusers transformer class, in one place.

A `ModelFamily` gives: the diffusers class, random-init presets, the loader of a local diffusers
folder (never a hub download), the velocity adapter (`velocity_fn(z, sigma, cond) -> v`), the
latent channel count the data must have, the transformer-block lists that activation
checkpointing, compile, FSDP units and FP8 use, and the FLOP counter of one forward.
`family_of(model)` and `family_of_folder(path)` find the family of a model or a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soar_fast.config.errors import ConfigError
from soar_fast.config.sd35 import pipeline_load_class

__all__ = ["FAMILIES", "ModelFamily", "family_names", "family_of", "family_of_folder", "get_family", "preset_table"]


@dataclass(frozen=True)
class ModelFamily:
    """What soar_fast knows about one diffusers transformer class."""

    name: str
    """Short name used by `--model.family` (e.g. 'sd3', 'flux')."""
    transformer_class: str
    """The diffusers class name (as in a folder's config.json `_class_name`)."""
    presets: Mapping[str, dict[str, Any]]
    """Architecture presets: constructor kwargs of a randomly initialised model."""
    velocity: Callable[[nn.Module], Callable]
    """`velocity(model) -> velocity_fn(z [N, C, H, W], sigma [N], cond) -> v [N, C, H, W]`."""
    block_attrs: tuple[str, ...]
    """Names of the model's `nn.ModuleList`s of transformer blocks, in forward order."""
    forward_flops: Callable[[nn.Module, int, int, int], float]
    """`forward_flops(model, latent_h, latent_w, text_len)`: FLOPs of one forward of one sample."""
    latent_channels: Callable[[Any], int]
    """Channels of the (unpacked) latents the model takes, from its config."""
    pipeline_class: str = ""
    """The diffusers pipeline class of the family (`soar-fast sample`, exports)."""
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module names LoRA adapts by default (`--model.lora_target_modules` overrides)."""
    text_dims: Callable[[Any], tuple[int, int]] = lambda c: (c.joint_attention_dim, c.pooled_projection_dim)
    """(width of the per-token text embeddings, width of the pooled embedding; 0: none) the model's
    condition takes, from its config: the data sources make `(prompt_embeds [N, T, D], pooled [N, P])`."""

    guidance_embedding: Callable[[Any], bool] = lambda c: False
    """Whether a model of this config is guidance-distilled: it takes the guidance scale as an
    embedding (`velocity(model, guidance=g)`), and SOAR's rollout can use it instead of true CFG."""

    def rollout_guidance(self, model: nn.Module, requested: str) -> str:
        """'cfg' or 'distilled': `SoarConfig.rollout_guidance` resolved for `model` ('auto':
        distilled where the model has a guidance embedding). Raises a one-line ConfigError for
        'distilled' on a model without one."""
        distilled = bool(self.guidance_embedding(model.config))
        if requested == "auto":
            return "distilled" if distilled else "cfg"
        if requested == "distilled" and not distilled:
            raise ConfigError(f"soar.rollout_guidance='distilled' needs a guidance-distilled model, and this "
                              f"{self.name} model has no guidance embedding: use --soar.rollout_guidance cfg (or auto)")
        return requested

    def rollout_velocity(self, model: nn.Module, soar: Any) -> Callable | None:
        """The velocity function of a distilled rollout (one B pass of the prompt, the guidance
        embedding at `soar.guidance_scale`), or None for true CFG (the 2B pass of `velocity(model)`)."""
        if self.rollout_guidance(model, soar.rollout_guidance) == "cfg":
            return None
        return self.velocity(model, guidance=soar.guidance_scale)

    def cls(self) -> type[nn.Module]:
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def build(self, preset: str, *, seed: int | None = 0, device: str | torch.device | None = None,
              **overrides: Any) -> nn.Module:
        """A randomly initialised model of `preset` (no download), initialised on `device`."""
        if preset not in self.presets:
            raise ConfigError(f"model.preset={preset!r} is not a {self.name} preset: choose one of "
                              f"{', '.join(self.presets)}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        kwargs = {**self.presets[preset], **overrides}

        def make() -> nn.Module:
            with dev:
                return self.cls()(**kwargs)

        if seed is None:
            return make()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            return make()

    def pipeline_cls(self, folder: str | Path | None = None) -> type:
        """The family's text-to-image pipeline class; for a local `folder` of a variant that loads as itself
        (`config.sd35.OWN_CLASS_PIPELINES`: FLUX.1 Kontext, FLUX.2 klein) that variant's class."""
        import diffusers

        own = pipeline_load_class(folder) if folder is not None else None
        return getattr(diffusers, own or self.pipeline_class)

    def from_pretrained(self, path: str | Path, subfolder: str | None = None, **kwargs: Any) -> nn.Module:
        """The transformer of a local diffusers folder (local files only)."""
        return self.cls().from_pretrained(str(path), subfolder=subfolder or None, local_files_only=True, **kwargs)

    def block_lists(self, model: nn.Module) -> list[nn.ModuleList]:
        """The model's ModuleLists of transformer blocks (unwrapped names: FSDP keeps attributes)."""
        lists = [getattr(model, a) for a in self.block_attrs if isinstance(getattr(model, a, None), nn.ModuleList)]
        if not lists:
            raise TypeError(f"{type(model).__name__} has none of the block lists {self.block_attrs}")
        return lists

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Every transformer block, in forward order: the units of checkpointing, compile and FSDP."""
        return [b for lst in self.block_lists(model) for b in lst]

    def step_flops(self, model: nn.Module, batch: int, num_aux: int, height: int, width: int, text_len: int,
                   rollout_rows: int = 2, frames: int = 1) -> float:
        """FLOPs of one SOAR step (num_aux=0: SFT): 3F(1+M)B for forward+backward of the (1+M)B
        rows plus 2BF for the no-grad CFG rollout (M > 0; `rollout_rows=1`: BF for a distilled
        rollout). With several rollout paths pass the point rows P·M (`SoarConfig.num_points`):
        the batched step runs all of them (a missing point is a zero-weight row, not a skipped
        one) and still one rollout. `frames`: latent frames of a video family (Wan's forward_flops
        takes them; 1 = an image)."""
        f = self.forward_flops(model, height, width, text_len, *((frames,) if frames != 1 else ()))
        rollout = rollout_rows * batch * f if num_aux > 0 else 0.0
        return 3.0 * f * (1 + num_aux) * batch + rollout


def _sd3() -> ModelFamily:
    from soar_fast.models.flops import sd3_forward_flops
    from soar_fast.models.sd3 import SD3_PRESETS, SD3VelocityFn

    return ModelFamily(name="sd3", transformer_class="SD3Transformer2DModel", presets=SD3_PRESETS,
                       velocity=SD3VelocityFn, block_attrs=("transformer_blocks",),
                       forward_flops=sd3_forward_flops, latent_channels=lambda c: c.in_channels,
                       pipeline_class="StableDiffusion3Pipeline")


def _flux() -> ModelFamily:
    from soar_fast.models.flops import flux_forward_flops
    from soar_fast.models.flux import FLUX_PRESETS, FluxVelocityFn

    return ModelFamily(name="flux", transformer_class="FluxTransformer2DModel", presets=FLUX_PRESETS,
                       velocity=FluxVelocityFn, block_attrs=("transformer_blocks", "single_transformer_blocks"),
                       forward_flops=flux_forward_flops, latent_channels=lambda c: c.in_channels // 4,
                       pipeline_class="FluxPipeline", guidance_embedding=lambda c: c.guidance_embeds)


FAMILIES: dict[str, ModelFamily] = {"sd3": _sd3(), "flux": _flux()}
# Families defined in their own module (`family() -> ModelFamily`), registered when the module is present.
_MODULES = {"flux2": "soar_fast.models.flux2", "qwenimage": "soar_fast.models.qwenimage",
            "zimage": "soar_fast.models.zimage", "wan": "soar_fast.models.wan"}


def _register_modules() -> None:
    import importlib
    import importlib.util

    for name, module in _MODULES.items():
        if name not in FAMILIES and importlib.util.find_spec(module) is not None:
            FAMILIES[name] = importlib.import_module(module).family()


def family_names() -> list[str]:
    _register_modules()
    return list(FAMILIES)


def preset_table(families: list[str] | None = None) -> list[tuple[str, str, int, str]]:
    """(family, preset, parameter count, diffusers class) of every preset, built on the meta device."""
    rows = []
    for name in families or family_names():
        fam = FAMILIES[name] if name in FAMILIES else get_family(name)
        for preset in fam.presets:
            model = fam.build(preset, seed=None, device="meta")
            rows.append((name, preset, sum(p.numel() for p in model.parameters()), fam.transformer_class))
    return rows


def get_family(name: str) -> ModelFamily:
    _register_modules()
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r} is invalid: choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a model, also when FSDP2 has wrapped its class (the MRO keeps the original)."""
    names = {c.__name__ for c in type(model).__mro__}
    _register_modules()
    for fam in FAMILIES.values():
        if fam.transformer_class in names:
            return fam
    raise ConfigError(f"{type(model).__name__} is not a supported transformer: soar_fast trains "
                      f"{', '.join(f.transformer_class for f in FAMILIES.values())}")


def family_of_folder(path: str | os.PathLike, subfolder: str = "") -> ModelFamily:
    """The family of a local diffusers model folder, from its config.json `_class_name`."""
    cfg = Path(path) / subfolder / "config.json" if subfolder else Path(path) / "config.json"
    try:
        cls = json.loads(cfg.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{str(cfg)!r} is missing or unreadable: pass a diffusers model folder "
                          "(its transformer subfolder holds config.json)") from None
    _register_modules()
    for fam in FAMILIES.values():
        if fam.transformer_class == cls:
            return fam
    raise ConfigError(f"{str(cfg)!r} holds a {cls}; soar_fast trains "
                      f"{', '.join(f.transformer_class for f in FAMILIES.values())}")
