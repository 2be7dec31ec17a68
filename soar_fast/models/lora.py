"""LoRA on `SD3Transformer2DModel` through peft, saved in the format diffusers pipelines load.

`apply_lora` freezes the base weights and adds adapters (the attention projections by default, as
diffusers' train_dreambooth_lora_sd3.py does). `save_lora_weights` writes
`pytorch_lora_weights.safetensors` with the family pipeline's `save_lora_weights`, including
the adapter metadata (rank, alpha, targets), so `pipe.load_lora_weights(dir)` restores the same
scaling. `merge_lora` folds the adapters into the base weights for a full `save_pretrained` export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from soar_fast.config import ConfigError

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoraSettings",
    "apply_lora",
    "lora_family",
    "lora_state_dict",
    "merge_lora",
    "peft_to_lora_layers",
    "save_lora_layers",
    "save_lora_weights",
    "trainable_parameters",
]

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""The image-stream attention projections of every SD3 block (diffusers' SD3 LoRA default)."""


@dataclass(kw_only=True)
class LoraSettings:
    """LoRA adapter settings (peft `LoraConfig` fields, diffusers flag names)."""

    rank: int = 32
    """r, the adapter rank (>= 1)."""
    lora_alpha: float | None = None
    """Scaling numerator (scale = alpha / rank); None uses alpha = rank (scale 1)."""
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    """Module-name suffixes to adapt; add 'add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out'
    for the text stream, 'proj_out' / 'ff.net.2' for more capacity."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    init_lora_weights: Literal["gaussian", "default"] = "gaussian"
    """'gaussian' (diffusers scripts) or peft's 'default' (Kaiming); B = 0 either way, so the
    adapted model starts equal to the base."""
    adapter_name: str = "default"
    """peft adapter name."""
    extra: dict = field(default_factory=dict)
    """Other `peft.LoraConfig` kwargs (e.g. use_dora=True)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"LoraSettings.rank={self.rank!r} is invalid: need an integer >= 1 (e.g. 16, 32, 64)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"LoraSettings.lora_alpha={self.lora_alpha!r} is invalid: need > 0 or None (= rank)")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"LoraSettings.lora_dropout={self.lora_dropout!r} is invalid: need a value in [0, 1)")
        if not self.target_modules:
            raise ConfigError("LoraSettings.target_modules is empty: name at least one module, e.g. to_q")

    def peft_config(self):  # -> peft.LoraConfig
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha if self.lora_alpha is not None else self.rank,
            target_modules=list(self.target_modules),
            lora_dropout=self.lora_dropout,
            init_lora_weights=self.init_lora_weights if self.init_lora_weights == "gaussian" else True,
            **self.extra,
        )


def apply_lora(transformer: nn.Module, settings: LoraSettings) -> nn.Module:
    """Freeze `transformer` and add LoRA adapters in place (via diffusers' `add_adapter`).

    Returns the same module; only adapter weights require grad. Raises `ConfigError` when no
    module matches `settings.target_modules`.
    """
    names = [n for n, _ in transformer.named_modules()]
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"LoraSettings.target_modules {missing} match no module of {type(transformer).__name__}")
    transformer.requires_grad_(False)
    transformer.add_adapter(settings.peft_config(), adapter_name=settings.adapter_name)
    return transformer


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (the adapters after `apply_lora`; everything for full FT)."""
    return [p for p in module.parameters() if p.requires_grad]


def lora_state_dict(transformer: nn.Module, adapter_name: str = "default") -> dict:
    """The adapter weights in peft's key format (what `save_lora_weights` writes)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def save_lora_weights(transformer: nn.Module, output_dir: str | Path, adapter_name: str = "default") -> Path:
    """Write `output_dir/pytorch_lora_weights.safetensors` for `StableDiffusion3Pipeline.load_lora_weights`
    (or `FluxPipeline.load_lora_weights` when the transformer is a `FluxTransformer2DModel`).

    The adapter config (rank, alpha, targets) is stored as metadata so loading keeps the scale.
    """
    if adapter_name not in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"{type(transformer).__name__} has no LoRA adapter {adapter_name!r}: apply_lora() it "
                         "first, or export a full fine-tune with export_transformer()")
    layers = {k: v.detach() for k, v in lora_state_dict(transformer, adapter_name).items()}
    from soar_fast.models.spec import family_of

    return save_lora_layers(layers, transformer.peft_config[adapter_name].to_dict(), output_dir,
                            pipeline_class=family_of(transformer).pipeline_class)


def peft_to_lora_layers(state: dict, adapter_name: str = "default") -> dict:
    """Adapter tensors of a model state dict (peft names `...lora_A.<adapter>.weight`) in the
    layout `save_lora_layers` takes (`...lora_A.weight`, as `get_peft_model_state_dict` gives)."""
    return {k.replace(f".{adapter_name}.", "."): v for k, v in state.items() if ".lora_" in k}


def save_lora_layers(layers: dict, metadata: dict, output_dir: str | Path,
                     pipeline_class: str = "StableDiffusion3Pipeline") -> Path:
    """`pytorch_lora_weights.safetensors` of adapter tensors (peft layout), fp32, through the
    pipeline's own `save_lora_weights` (diffusers key prefixes and adapter metadata); the
    pipeline class is the family's (`ModelFamily.pipeline_class`)."""
    import diffusers

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {k: v.float().cpu().contiguous() for k, v in layers.items()}
    pipeline_cls = getattr(diffusers, pipeline_class)
    pipeline_cls.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    path = out / "pytorch_lora_weights.safetensors"
    _stamp_family(path, pipeline_class)
    return path


FAMILY_KEY = "soar_fast.family"
"""Safetensors metadata key of the family a LoRA was trained for (`lora_family`)."""


def _stamp_family(path: Path, pipeline_class: str) -> None:
    """Add the family of `pipeline_class` to the file's metadata (kept beside diffusers' own), so a
    LoRA given to another family's pipeline is refused in one line instead of loading no key."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from soar_fast.models.spec import FAMILIES, family_names

    family_names()  # register every family
    name = next((f.name for f in FAMILIES.values() if f.pipeline_class == pipeline_class), None)
    if name is None:
        return
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tmp = path.with_suffix(".tmp")
    save_file(load_file(str(path)), str(tmp), metadata={**meta, FAMILY_KEY: name})
    tmp.replace(path)


def lora_family(path: str | Path) -> str | None:
    """The family a LoRA file was trained for (written by `save_lora_layers`), None if not ours."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(FAMILY_KEY)


def merge_lora(transformer: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and remove the adapter modules, in place.

    The result has the stock state-dict keys, ready for `save_pretrained` as a full model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
    transformer._hf_peft_config_loaded = False
    return transformer
