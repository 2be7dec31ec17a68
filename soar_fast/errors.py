"""The one error path of the command line: an error a user can cause becomes one line,
`soar-fast: error: <what>; <fix>`, exit code 2; anything else stays a traceback (a bug to report).

`explain(err)` maps an exception to that line or None. It knows our own errors (ConfigError and
its kin: their message is the line), OSError by errno (no space left: where, and how much is
free; permission denied: which path; a missing or read-only path), torch's wrappers of those
(`PytorchStreamWriter failed writing file`, `unexpected pos` is a full disk), state-dict shape
mismatches (a checkpoint or LoRA of another model), a device that does not exist, and running out
of GPU memory. `--debug` on the command line or `SOAR_FAST_DEBUG=1` shows the traceback instead.
Under torchrun an error every rank hits alike (bad config) is printed by rank 0 only; one that is
a single rank's own is printed by that rank, prefixed with it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

__all__ = ["SHARED", "configure_logging", "debug_requested", "explain", "format_error", "is_disk_full"]

DEBUG_ENV = "SOAR_FAST_DEBUG"


def configure_logging() -> None:
    """The command line's log lines (`LEVEL logger: message`, INFO and up), without the import-time
    noise of an optional torchao installed beside other versions: its CUDA-only kernels failing to
    load on a CPU, torch's pytree deprecation of its enums, diffusers' torchao quantizer."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(`--debug` given or SOAR_FAST_DEBUG set, argv without `--debug`)."""
    on = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return on, [a for a in argv if a != "--debug"]


def is_disk_full(err: BaseException) -> bool:
    """An ENOSPC, or torch's words for one (`unexpected pos`), also inside DCP's per-rank wrapper."""
    failures = getattr(err, "failures", None)
    inner = [f[0] if isinstance(f, tuple) else f for f in failures.values()] if isinstance(failures, dict) else [err]
    return any(isinstance(e, OSError) and e.errno == errno.ENOSPC or "unexpected pos" in str(e)
               or "No space left" in str(e) for e in inner)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _free(path: str | None) -> str:
    """'; N GB free on <mount of path>' where it can be measured."""
    probe = Path(path or ".").expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f" ({_size(shutil.disk_usage(probe).free)} free there)"
    except OSError:
        return ""


def _os_error(err: OSError) -> str | None:
    path = err.filename if isinstance(err.filename, str) else None
    where = f" {path!r}" if path else ""
    if err.errno == errno.ENOSPC or (err.errno is None and "No space left" in str(err)):
        need = getattr(err, "needed_bytes", None)
        need = f", which needs about {_size(need)}" if need else ""
        return (f"no space left on the device while writing{where or ' the run folder'}{need}"
                f"{_free(path) if path else ''}; "
                "free space there, lower "
                "--checkpoints_total_limit or choose another --output_dir, then rerun with --resume")
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on{where or ' a path'}; choose a folder you can write (--output_dir) or fix its permissions"
    if err.errno == errno.EROFS:
        return f"{path or 'the path'} is on a read-only file system; choose a writable --output_dir"
    if err.errno == errno.ENOENT and path:
        return f"{path!r}: no such file or folder, and it cannot be created there; check the path (folders are read locally, never downloaded)"
    if err.errno == errno.EEXIST and path and not os.path.isdir(path):
        return f"{path!r} is a file where a folder is needed; pass another folder path"
    if err.errno == errno.ENOTDIR and path:
        return f"{path!r} is not a folder (a file is in the way); pass a folder path"
    if err.errno == errno.EISDIR and path:
        return f"{path!r} is a folder where a file was expected; pass a file path"
    return None


_SIZE = re.compile(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) from "
                   r"checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))")


def _runtime_error(err: BaseException) -> str | None:
    text = str(err)
    first = text.splitlines()[0] if text else ""
    if "PytorchStreamWriter failed" in text or is_disk_full(err):
        return (f"writing a file failed, most likely no space left on the device{_free(None)}; free space or "
                "choose another --output_dir, then rerun with --resume")
    m = _SIZE.search(text)
    if m:
        return (f"the weights do not fit this model: {m.group(1)} is {m.group(2)} there but {m.group(3)} here; load "
                "them into the model they were trained from (same --model.preset / folder, same --model.lora_rank)")
    m = re.search(r"Size mismatch between saved (torch\.Size\(\[[\d, ]*\]\)) and current: (torch\.Size\(\[[\d, ]*\]\)) "
                  r"for ([\w.]+)", text)
    if m:  # torch.distributed.checkpoint
        return (f"the checkpoint does not fit this model: {m.group(3)} is {m.group(1)} there but {m.group(2)} here; "
                "resume with the model flags of the run that wrote it (--model.preset, --model.num_layers, ...)")
    m = re.search(r"Missing key in checkpoint state_dict: ([\w.]+)", text)
    if m:
        return (f"the checkpoint does not fit this model: it has no {m.group(1).rstrip('.')}; resume with the model "
                "flags of the run that wrote it (--model.preset, --model.num_layers, --model.lora_*)")
    if "Error(s) in loading state_dict" in text:
        missing = re.search(r'Missing key\(s\) in state_dict: "([^"]+)"', text)
        what = f" (e.g. {missing.group(1)} is missing)" if missing else ""
        return (f"the weights do not match this model{what}; load them into the model they were trained from "
                "(same --model.preset / folder, same --model.lora_rank)")
    if "invalid device ordinal" in text or "CUDA error: invalid device" in text:
        return "the requested CUDA device does not exist here; pass --runtime.device cuda:0 (or cpu)"
    if ("Torch not compiled with CUDA" in text or "No CUDA GPUs are available" in text
            or "Found no NVIDIA driver" in text):
        return f"no usable CUDA device here ({first[:80]}); pass --runtime.device cpu or run on a machine with a GPU"
    return None


def explain(err: BaseException) -> str | None:
    """The one line for an error a user can cause, or None (a bug: keep the traceback)."""
    from soar_fast.config import ConfigError
    from soar_fast.data.images import CaptionError
    from soar_fast.data.shards import ShardError
    from soar_fast.train.checkpoint import CheckpointError

    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint wraps each rank's error
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return explain(inner[0] if isinstance(inner, tuple) else inner)
    if isinstance(err, (ConfigError, CheckpointError, ShardError, CaptionError)):
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return ("out of GPU memory; lower --train_batch_size (raise --gradient_accumulation_steps to keep the "
                    "global batch), add --fast.activation_checkpointing or --fast.micro_chunks 2, or use LoRA")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(err, OSError):
        return _os_error(err)
    if isinstance(err, (RuntimeError, ValueError, AssertionError)):
        return _runtime_error(err)
    return None


SHARED = ("ConfigError", "CheckpointError", "UsageError", "NotAPipelineError", "CaptionError")


def format_error(line: str, err: BaseException) -> str | None:
    """The printed line, or None when this rank stays silent (a shared error under torchrun, rank > 0)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    shared = any(c.__name__ in SHARED for c in type(err).__mro__)
    if world > 1 and shared and rank != 0:
        return None
    prefix = f"rank {rank}: " if world > 1 and not shared else ""
    return f"soar-fast: error: {prefix}{line}"
