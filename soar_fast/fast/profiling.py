"""NVTX ranges and torch.profiler traces; both are no-ops where they cannot run (CPU)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["nvtx_range", "step_profiler"]

log = logging.getLogger(__name__)
_nvtx = None
_nvtx_checked = False


def _nvtx_module():
    """The `nvtx` package on CUDA machines (torch.cuda.nvtx fails with CPU torch), else None."""
    global _nvtx, _nvtx_checked
    if not _nvtx_checked:
        _nvtx_checked = True
        if torch.cuda.is_available():
            try:
                import nvtx

                _nvtx = nvtx
            except Exception:  # noqa: BLE001
                _nvtx = torch.cuda.nvtx
    return _nvtx


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range visible in Nsight Systems; nothing on a machine without CUDA."""
    mod = _nvtx_module()
    if mod is None:
        yield
        return
    if hasattr(mod, "annotate"):
        with mod.annotate(name):
            yield
    else:
        mod.range_push(name)
        try:
            yield
        finally:
            mod.range_pop()


def step_profiler(out_dir: str | Path | None, wait: int = 1, warmup: int = 1, active: int = 3):
    """A torch.profiler schedule writing a TensorBoard/Chrome trace to out_dir (None: no-op).

    Use as `with step_profiler(dir) as prof: ... prof.step()` once per training step."""
    if out_dir is None:
        return contextlib.nullcontext(_NoProfiler())
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(out_dir)),
        record_shapes=True,
    )


class _NoProfiler:
    def step(self) -> None:
        pass
