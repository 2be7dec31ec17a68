"""Atomic, verifiable checkpoints: `<output_dir>/checkpoints/checkpoint-<step>/`.

A checkpoint is written into a temporary sibling folder, every file fsynced, a `manifest.json`
(size and sha256 of each file) written last, then renamed into place in one `os.rename`: a crash
at any point leaves either the old set of checkpoints or the old set plus the new one, never a
half-written `checkpoint-<step>`. Loading verifies the manifest; a corrupt or truncated newest
checkpoint falls back to the previous good one with a warning.

Files: model.safetensors, ema.safetensors (optional), optimizer.pt, rng.safetensors (torch CPU,
CUDA and the step generator), state.json (step, data position, counters, python/numpy RNG),
transformer_config.json (to rebuild the model without the run's config).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "find_checkpoints", "load_checkpoint", "resolve_resume", "save_checkpoint",
           "verify_checkpoint"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """No loadable checkpoint where one was asked for; the message names the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest (highest step) first. Temp folders are ignored."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of `path` after checking every file's size and sha256; raises CheckpointError."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: manifest unreadable ({e.__class__.__name__})") from None
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"{path}: {name} is truncated ({f.stat().st_size} of {info['size']} bytes)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupt (sha256 mismatch)")
    return manifest


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _is_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: the full state dict, or for a LoRA (peft-wrapped) model only its
    trainable adapter weights (peft key names, e.g. `...attn.to_q.lora_A.default.weight`); the frozen
    base is re-read from `--pretrained_model_name_or_path` on resume."""
    if _is_lora(model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def _load_model_tensors(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    if not _is_lora(model):
        model.load_state_dict(weights, strict=True)
        return
    want = set(_model_tensors(model))
    missing, unexpected = sorted(want - set(weights)), sorted(set(weights) - want)
    if missing or unexpected:
        what = f"misses {missing[0]}" if missing else f"has {unexpected[0]}, not a LoRA adapter weight of this model"
        raise CheckpointError(f"checkpoint {path} does not match the LoRA model ({what}); resume with the same "
                              "--model.lora_rank / --model.lora_target_modules as the run that wrote it")
    model.load_state_dict(weights, strict=False)


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and keep the newest `total_limit`. Returns its path."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in _model_tensors(model).items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state().cpu()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": _rng_state()}))
    model_cfg = getattr(model, "config", None)
    if model_cfg is not None:
        (tmp / "transformer_config.json").write_text(json.dumps(dict(model_cfg), default=list))
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync(f)
        files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = tmp / "manifest.json"
    manifest.write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, "files": files}, indent=1))
    _fsync(manifest)
    if final.exists():  # re-saving the same step (e.g. a SIGTERM right after a periodic save)
        old = root / f".old-checkpoint-{step}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(root)
    if total_limit:
        for stale in find_checkpoints(root)[total_limit:]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_resume(resume: str, ckpt_root: str | Path) -> list[Path]:
    """Candidates for `--resume_from_checkpoint`: 'latest' -> every checkpoint newest first (the
    loader falls back along the list); a folder -> just that one (no silent fallback)."""
    if resume == "latest":
        return find_checkpoints(ckpt_root)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {resume!r} does not exist; pass 'latest' or an existing checkpoint-<step> folder")
    return [path]


def load_checkpoint(
    candidates: list[Path],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ema: Any | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Restore from the first good candidate (verified manifest, loadable files) and return it
    with its state.json. Warns for each corrupt candidate skipped; raises if none is good."""
    errors = []
    for path in candidates:
        try:
            verify_checkpoint(path)
            weights = load_file(str(path / "model.safetensors"))
            opt_state = torch.load(path / "optimizer.pt", weights_only=True)
            rng = load_file(str(path / "rng.safetensors"))
            state = json.loads((path / "state.json").read_text())
            has_ema = ema is not None and (path / "ema.safetensors").is_file()
            ema_state = load_file(str(path / "ema.safetensors")) if has_ema else None
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            errors.append(msg)
            log.warning("checkpoint %s is unusable (%s); trying the previous one", path, msg)
            continue
        _load_model_tensors(model, weights, path)
        optimizer.load_state_dict(opt_state)
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        elif ema is not None:
            log.warning("checkpoint %s has no EMA weights; the EMA restarts from the loaded weights", path)
            ema.reset(model)
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        random.setstate(_tuplify(state["rng"]["python"]))
        kind, keys, pos, has_gauss, cached = state["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        return path, state
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise CheckpointError(f"no loadable checkpoint among {[str(p) for p in candidates]}{detail}; "
                          "start fresh in a new --output_dir or pass a good checkpoint folder")
