"""The one exporter: the trained transformer as files diffusers loads, at any world size.

Full fine-tune: `final/transformer/` (config.json + diffusion_pytorch_model.safetensors, loadable by
`<Family>Transformer2DModel.from_pretrained`); with EMA it holds the EMA weights (the default
export, what the pipeline loads) and `final/transformer_online/` the last optimizer step's. When
the run started from a pipeline folder (`model_index.json`), `final/` is a pipeline folder too:
its `model_index.json` and every other component (text encoders, VAE, scheduler, ...) come from
the source, hard-linked where the file system allows (no extra disk), copied otherwise, so
`<Family>Pipeline.from_pretrained(final)` loads the trained model. LoRA:
`final/pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(final)`) and, with EMA,
`final/ema/`. Wan 2.2's two experts (`WanExperts`) export as the pipeline holds them: the high-noise
expert in `transformer/`, the low-noise one in `transformer_2/` (LoRA: the high expert's adapters in
`final/`, the low one's in `final/transformer_2/`, loaded with `load_lora_weights(...,
load_into_transformer_2=True)`; an expert that was not trained has none). Collective: the shards are
gathered to rank 0, which writes into a temporary folder and renames it into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from soar_fast.distributed.env import barrier, is_main_process
from soar_fast.models.lora import peft_to_lora_layers, save_lora_layers
from soar_fast.models.pipeline import copy_pipeline_components
from soar_fast.models.spec import ModelFamily
from soar_fast.models.wan import WanExperts
from soar_fast.train.ema import EMA

__all__ = ["export_final", "write_diffusers_folder"]

log = logging.getLogger(__name__)


def write_diffusers_folder(folder: Path, family: ModelFamily, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """config.json (the family's class name, not FSDP's wrapper class) + the weights."""
    import diffusers
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cfg.update(_class_name=family.transformer_class, _diffusers_version=diffusers.__version__)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=list))
    out = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"format": "pt"})
    return out


def _components(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(pipeline subfolder, state-dict key prefix, module) of each transformer the model holds."""
    if isinstance(model, WanExperts):  # FSDP2 shards it in place: still a WanExperts
        return [("transformer", "high.", model.high), ("transformer_2", "low.", model.low)]
    return [("transformer", "", model)]


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if prefix else tensors


def export_final(model: nn.Module, family: ModelFamily, out_dir: str | Path, *, lora_rank: int,
                 ema: EMA | None = None, source: str | Path | None = None) -> Path:
    """Collective: write `<out_dir>/final` as described above (`source`: the folder the run's model
    came from, if any); returns its path."""
    out = Path(out_dir)
    final, tmp = out / "final", out / ".tmp-final"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    lora = bool(lora_rank)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    full = get_model_state_dict(model, options=opts)  # gathered on rank 0 (empty elsewhere)
    ema_full = None
    if ema is not None:  # every rank joins each gather; rank 0 keeps the tensors
        ema_full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu() for n, t in ema.shadow.items()}
    if is_main_process():
        parts = _components(model)
        if lora:
            for sub, prefix, module in parts:
                if not hasattr(module, "peft_config"):  # an expert that was not trained
                    continue
                meta, where = module.peft_config["default"].to_dict(), tmp if sub == "transformer" else tmp / sub
                save_lora_layers(peft_to_lora_layers(_part(full, prefix)), meta, where,
                                 pipeline_class=family.pipeline_class)
                if ema_full is not None:
                    save_lora_layers(peft_to_lora_layers(_part(ema_full, prefix)), meta, where / "ema",
                                     pipeline_class=family.pipeline_class)
        else:
            online = full
            if ema_full is not None:  # the EMA weights are the export; the online ones stay beside them
                dtype = next(iter(full.values())).dtype
                full = {**full, **{n: v.to(dtype) for n, v in ema_full.items() if n in full}}
            for sub, prefix, module in parts:
                if ema_full is not None:
                    write_diffusers_folder(tmp / f"{sub}_online", family, module.config, _part(online, prefix))
                write_diffusers_folder(tmp / sub, family, module.config, _part(full, prefix))
            if source is not None and copy_pipeline_components(source, tmp, how="hardlink",
                                                               skip=tuple(sub for sub, _, _ in parts)):
                log.info("final/ is a %s folder: components linked from %s", family.pipeline_class, source)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        log.info("exported %s", final)
    barrier()
    return final
