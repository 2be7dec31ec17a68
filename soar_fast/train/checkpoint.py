"""The one checkpoint manager: `<output_dir>/checkpoints/step_<step:08d>/`, resumable at any world size.

A checkpoint is a Distributed Checkpoint (DCP) folder of `{"model", "optim", "ema"}` (LoRA runs:
the adapters only; the frozen base is rebuilt from the run's config) plus `state.json` (step,
world size, data position, counters) and `manifest.json` (size and sha256 of every file, hashed
by the ranks in parallel), written last. Every rank writes into `.tmp-step_<step>/`; rank 0
renames it into place in one `os.rename` after all ranks are done, so a crash leaves either the
old set of checkpoints or the old set plus the new one. DCP reshards on load: a checkpoint of W
ranks resumes on any number of ranks, a plain process included (world size 1 of the same code).
Loading verifies the manifest; a corrupt or truncated newest checkpoint falls back to the previous
good one with a warning. No RNG state is saved: every draw is keyed by (seed, step, sample).

Older formats: a torchrun checkpoint of soar_fast 0.1 (`step_<step>` with `meta.json`, no
manifest) loads; a single-process `checkpoint-<step>` folder (safetensors) is refused in one line.

Housekeeping (rank 0): `clean_partial_checkpoints` removes the `.tmp-step_*` debris of a write
that was killed (and puts back a `.old-step_*` whose replacement never landed); the trainer calls
it at the start and at the end of a run. `set_aside_checkpoints` renames checkpoints that hold the
weights of a NaN/inf streak to `nan-step_<step>`, so 'latest' never resumes into the same streak
(they stay loadable by their folder name).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from soar_fast.config import ConfigError
from soar_fast.distributed.env import barrier as _barrier
from soar_fast.distributed.env import get_rank as _rank
from soar_fast.distributed.env import get_world_size as _world
from soar_fast.errors import is_disk_full
from soar_fast.train.ema import EMA

__all__ = ["CheckpointError", "checkpoint_step", "clean_partial_checkpoints", "find_checkpoints", "legacy_checkpoints",
           "load_checkpoint", "resolve_resume", "save_checkpoint", "set_aside_checkpoints", "verify_checkpoint"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
_STEP = re.compile(r"^step_(\d+)$")
_LEGACY = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^\.(tmp|old)-step_(\d+)$")
SET_ASIDE_PREFIX = "nan-"


class CheckpointError(RuntimeError):
    """No loadable checkpoint where one was asked for; the message names the fix."""


def _gather(obj: Any) -> list[Any]:
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


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
    """Complete checkpoint folders (`state.json`, or a 0.1 torchrun `meta.json`), newest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP.match(p.name)) and ((p / "state.json").is_file() or (p / "meta.json").is_file())]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_step(path: str | Path) -> int:
    """The step of a `step_<step>` folder."""
    m = _STEP.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a step_<step> checkpoint folder")
    return int(m.group(1))


def clean_partial_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Rank 0, with no save in flight: remove the `.tmp-step_*` folders of killed writes; a
    `.old-step_<s>` (the previous copy of a re-saved step) is put back as `step_<s>` when the new
    copy never landed, else removed. Returns the paths removed."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        m = _PARTIAL.match(p.name)
        if m is None or not p.is_dir():
            continue
        final = root / f"step_{m.group(2)}"
        if m.group(1) == "old" and not final.exists() and (p / "state.json").is_file():
            p.rename(final)
            log.warning("restored %s from %s (its re-save was interrupted)", final, p.name)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        log.info("removed %d leftover temporary checkpoint folder(s) under %s", len(removed), root)
    return removed


def set_aside_checkpoints(ckpt_root: str | Path, from_step: int) -> list[Path]:
    """Rank 0: rename every checkpoint of step >= `from_step` to `nan-step_<step>` (replacing an
    older one of that name), so `find_checkpoints` and 'latest' skip it. Returns the new paths."""
    moved = []
    for p in find_checkpoints(ckpt_root):
        if checkpoint_step(p) >= from_step:
            dest = p.with_name(SET_ASIDE_PREFIX + p.name)
            shutil.rmtree(dest, ignore_errors=True)
            p.rename(dest)
            moved.append(dest)
    return moved


def legacy_checkpoints(root: Path) -> list[Path]:
    """soar_fast 0.1's single-process `checkpoint-<step>` folders under `root` (not resumable)."""
    return sorted(p for p in root.iterdir() if _LEGACY.match(p.name)) if root.is_dir() else []


def _refuse_legacy(root: Path) -> None:
    old = [p.name for p in legacy_checkpoints(root)]
    if old:
        raise ConfigError(f"{str(root / old[-1])!r} is a single-process checkpoint of soar_fast 0.1 (safetensors), "
                          "which this version does not resume: finish that run with soar_fast 0.1 (git checkout "
                          "c0e2fc7) or start a new run in another --output_dir")


def _files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != "manifest.json")


def _hash_share(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """This rank's share of the files (every W-th), with size and sha256."""
    mine = names[_rank()::_world()]
    return {n: {"size": (path / n).stat().st_size, "sha256": _sha256(path / n)} for n in mine}


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of `path` after this rank checked its share of the files (all of them in a
    one-rank world); raises CheckpointError naming the first bad file."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: manifest unreadable ({e.__class__.__name__})") from None
    names = sorted(manifest.get("files", {}))
    for name in names[_rank()::_world()]:
        info, f = manifest["files"][name], path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"{path}: {name} is truncated ({f.stat().st_size} of {info['size']} bytes)")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupt (sha256 mismatch)")
    return manifest


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, lora: bool) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=lora))
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.shadow
    return state


class DiskFullError(OSError):
    """No space left while writing a checkpoint; `needed_bytes` is the checkpoint's size (all ranks)."""

    def __init__(self, path: str, needed_bytes: int):
        super().__init__(errno.ENOSPC, "No space left on device", path)
        self.needed_bytes = needed_bytes


def _nbytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state dict (a DTensor counts its global size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "state_dict"):
        return _nbytes(obj.state_dict())
    return 0


def save_checkpoint(ckpt_root: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: EMA | None, state: dict[str, Any], lora_rank: int = 0, keep: int = 3) -> Path:
    """Collective: write `step_<step>` atomically, keep the newest `keep`; returns its path.
    `state` (JSON, the same on every rank) is stored in state.json with the step and world size."""
    root = Path(ckpt_root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
        tmp.mkdir(parents=True)
    _barrier()
    state_dict = _state(model, optimizer, ema, bool(lora_rank))
    try:
        dcp.save(state_dict, checkpoint_id=str(tmp))
    except BaseException as err:  # DCP wraps each rank's error in a BaseException
        if is_disk_full(err):
            raise DiskFullError(str(tmp), _nbytes(state_dict)) from None
        raise
    _barrier()
    if _rank() == 0:
        meta = {**state, "format_version": FORMAT_VERSION, "step": step, "world_size": _world(),
                "lora_rank": lora_rank, "has_ema": ema is not None}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        _fsync(tmp / "state.json")
    _barrier()
    names = _files(tmp)
    files: dict[str, Any] = {}
    for share in _gather(_hash_share(tmp, names)):
        files.update(share)
    if _rank() == 0:
        (tmp / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step,
                                                       "files": files}, indent=1))
        _fsync(tmp / "manifest.json")
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            old = root / f".old-step_{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(root)
        for stale in find_checkpoints(root)[keep:]:
            shutil.rmtree(stale, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def resolve_resume(resume: str, ckpt_root: str | Path) -> list[Path]:
    """Candidates for `--resume_from_checkpoint`: 'latest' -> every checkpoint newest first (the
    loader falls back along the list); a folder -> just that one (no silent fallback)."""
    root = Path(ckpt_root)
    if resume == "latest":
        found = find_checkpoints(root)
        if not found:
            _refuse_legacy(root)
        return found
    path = Path(resume)
    if _LEGACY.match(path.name) and path.is_dir():
        _refuse_legacy(path.parent)
    if not path.is_dir() or not ((path / "state.json").is_file() or (path / "meta.json").is_file()):
        raise CheckpointError(f"checkpoint folder {resume!r} does not exist or is incomplete; pass 'latest' or a "
                              "checkpoints/step_<step> folder")
    return [path]


def _read_state(path: Path) -> dict[str, Any]:
    """state.json, or the 0.1 torchrun meta.json mapped to its fields (no manifest to verify)."""
    if (path / "state.json").is_file():
        verify_checkpoint(path)
        return json.loads((path / "state.json").read_text())
    meta = json.loads((path / "meta.json").read_text())
    extra = meta.get("extra", {})
    return {"step": meta["step"], "world_size": meta.get("world_size"), "sampler": extra["sampler"],
            "nan_skipped": extra.get("nan_skipped", 0), "nan_streak": extra.get("nan_streak", 0),
            "lora_rank": 0, "has_ema": False, "format_version": 1}


def load_checkpoint(candidates: list[Path], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: EMA | None, lora_rank: int = 0) -> tuple[Path, dict[str, Any]]:
    """Collective: restore from the first candidate that every rank finds good; returns it and its
    state. Warns for each bad candidate skipped; raises CheckpointError if none is good."""
    errors = []
    for path in candidates:
        try:
            state, why = _read_state(path), ""
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
            state, why = None, str(e).splitlines()[0] if str(e) else type(e).__name__
        whys = [w for w in _gather(why) if w]
        if whys:
            errors.append(whys[0])
            if _rank() == 0:
                log.warning("checkpoint %s is unusable (%s); trying the previous one", path, whys[0])
            continue
        if int(state.get("lora_rank", 0)) != lora_rank:
            raise CheckpointError(f"checkpoint {path} was written with --model.lora_rank {state.get('lora_rank', 0)}, "
                                  f"this run has {lora_rank}; resume with the same LoRA settings as the run that wrote it")
        want = _state(model, optimizer, ema if state.get("has_ema") else None, bool(lora_rank))
        try:
            dcp.load(want, checkpoint_id=str(path))
        except Exception as e:  # noqa: BLE001 - a mismatch of keys or shapes: one line for the user
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise CheckpointError(f"checkpoint {path} does not fit this model ({first}); resume with the model "
                                  "settings of the run that wrote it") from None
        set_state_dict(model, optimizer, model_state_dict=want["model"], optim_state_dict=want["optim"],
                       options=StateDictOptions(ignore_frozen_params=bool(lora_rank), strict=not lora_rank))
        if ema is not None and not state.get("has_ema"):
            if _rank() == 0:
                log.warning("checkpoint %s has no EMA weights; the EMA restarts from the loaded weights", path)
            ema.reset(model)
        return path, state
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise CheckpointError(f"no loadable checkpoint among {[str(p) for p in candidates]}{detail}; "
                          "start fresh in a new --output_dir or pass a good checkpoint folder")
