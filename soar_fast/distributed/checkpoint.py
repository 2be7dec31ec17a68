"""Distributed checkpoints (DCP): sharded save/load of model + optimizer, and a full export.

Layout under a checkpoint root (a filesystem every rank sees):
    step_00000100/          DCP shards (*.distcp, .metadata) + meta.json (step, world size,
                            sampler, user state) + rng/rank<r>.pt (per-rank RNG states)
    step_00000100.tmp/      a save in progress; renamed by rank 0 after every rank wrote its part
A checkpoint directory without the `.tmp` suffix is complete. DCP reshards on load, so a
checkpoint written by W ranks loads on any world size (the RNG states only when W matches).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from soar_fast.distributed.env import barrier, get_rank, get_world_size, is_main_process

__all__ = [
    "export_full_state_dict",
    "full_state_dict",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = _complete_checkpoints(Path(root))
    return found[-1][1] if found else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 3,
) -> Path:
    """Collective: every rank writes its shards; returns the final directory.

    `extra` must be JSON-serialisable and the same on every rank (step counters, sampler state,
    config); rank 0 writes it. Keeps the newest `keep_last` checkpoints (0 keeps all).
    """
    root = Path(root)
    final, tmp = _step_dir(root, step), _step_dir(root, step).with_suffix(".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
        tmp.mkdir(parents=True)
    barrier()
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{get_rank()}.pt")
    barrier()
    if is_main_process():
        meta = {"step": step, "world_size": get_world_size(), "has_optimizer": optimizer is not None,
                "extra": extra or {}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last > 0:
            for _, old in _complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Collective: load model (and optimizer) state into the (possibly FSDP2-sharded) modules.

    Works at any world size. Restores this rank's RNG states when the checkpoint was written by
    the same world size and `restore_rng`. Returns meta.json: {'step', 'world_size', 'extra', ...}.
    """
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if optimizer is not None and meta.get("has_optimizer", True):
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    rng = path / "rng" / f"rank{get_rank()}.pt"
    if restore_rng and meta.get("world_size") == get_world_size() and rng.is_file():
        saved = torch.load(rng, weights_only=True)
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    barrier()
    return meta


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) model state dict on CPU, on rank 0 (empty elsewhere).

    Keys are the stock ones (no checkpoint / compile / FSDP prefixes).
    """
    if dist.is_available() and dist.is_initialized():
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    from soar_fast.distributed.parallelize import unwrap_name

    return {unwrap_name(k): v.detach().cpu() for k, v in model.state_dict().items()}


def export_full_state_dict(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """Collective: gather the full weights and write them on rank 0.

    A diffusers model (one with `save_config`) becomes a diffusers folder: `config.json` plus
    `diffusion_pytorch_model.safetensors`, loadable with `from_pretrained(path)`. Any other
    module gets `path/model.safetensors`. Returns the weights file on rank 0, None elsewhere.
    """
    from safetensors.torch import save_file

    sd = full_state_dict(model)
    out = None
    if is_main_process():
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}
        if hasattr(model, "save_config"):
            model.save_config(path)  # diffusers ConfigMixin: config.json
            out = path / "diffusion_pytorch_model.safetensors"
        else:
            out = path / "model.safetensors"
        save_file(tensors, str(out), metadata={"format": "pt"})
        log.info("exported %d tensors to %s", len(tensors), out)
    barrier()
    return out
