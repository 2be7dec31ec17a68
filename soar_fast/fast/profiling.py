"""NVTX ranges and torch.profiler traces (both no-ops where they cannot run: CPU), and
`count_host_syncs`, which counts the operations that make the host wait for the device."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = ["HostSyncs", "count_host_syncs", "nvtx_range", "step_profiler"]

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
    """An NVTX range visible in Nsight Systems (nothing on a machine without CUDA), and a
    `torch.profiler.record_function` range while a torch profiler records (the step benchmark's
    `--profile` breakdown attributes kernels to these ranges)."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(name), _nvtx_only(name):
            yield
        return
    with _nvtx_only(name):
        yield


@contextlib.contextmanager
def _nvtx_only(name: str) -> Iterator[None]:
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


# aten ops whose result the host must read before it can go on: a scalar to Python, or an output
# whose shape depends on the data
_SYNC_ATEN = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique2", "unique_dim",
              "unique_consecutive", "repeat_interleave"}
# Tensor methods that copy to the host without going through an aten op
_SYNC_METHODS = {"tolist", "numpy"}


@dataclass
class HostSyncs:
    """What `count_host_syncs` saw: one entry per sync, `(op, where, via)`: `where` the nearest
    caller outside torch (file:line), `via` the torch function it called that synced ("" when the
    caller's own line did), e.g. torch/optim/optimizer.py for AdamW reading its host-side step
    counter (a CPU tensor even on a GPU run: no device sync there)."""

    events: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)

    def __str__(self) -> str:
        return "; ".join(f"{op} at {where}" for op, where, _ in self.events) or "no host sync"

    def add(self, op: str) -> None:
        frames = [f for f in traceback.extract_stack() if not f.filename.endswith("soar_fast/fast/profiling.py")]
        i = next((k for k in range(len(frames) - 1, -1, -1) if "/torch/" not in frames[k].filename), None)
        outer = "?" if i is None else f"{frames[i].filename.rsplit('/', 1)[-1]}:{frames[i].lineno}"
        via = frames[i + 1] if i is not None and i + 1 < len(frames) else None  # the torch API it called
        self.events.append((op, outer, "" if via is None else f"{via.filename}:{via.lineno}"))


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, out: HostSyncs):
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        kwargs = kwargs or {}
        if name in _SYNC_ATEN and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
            self.out.add(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())):
            self.out.add(f"{name} with a boolean mask")
        elif name in ("_to_copy", "copy_"):  # device -> host copies (blocking)
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            if (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None
                    and torch.device(dst).type == "cpu" and not kwargs.get("non_blocking", False)):
                self.out.add(f"{name} to cpu")
        return func(*args, **kwargs)


class _SyncFunction(TorchFunctionMode):
    def __init__(self, out: HostSyncs):
        super().__init__()
        self.out = out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _SYNC_METHODS:
            self.out.add(func.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs(model: torch.nn.Module | None = None) -> Iterator[HostSyncs]:
    """Count the host syncs of the code inside: `.item()`, `bool()`/`float()` of a tensor, `.tolist()`,
    data-dependent shapes (`nonzero`, boolean masks, `unique`, ...), blocking device-to-host copies.
    Works on any device, CPU included (a sync there costs nothing, but the same code on a GPU waits),
    so a test on CPU can prove a step has none.

    torch.compile cannot trace under these modes: pass `model` and its `torch.compile`d submodules
    (`module.compile(fullgraph=True)`, as `soar_fast.fast.compile` does) run with the counting paused.
    A fullgraph region cannot hold a sync (it would be a graph break, which fullgraph refuses), so
    what is counted is everything the compiled regions leave to eager Python."""
    out = HostSyncs()
    patched = []
    for module in (model.modules() if model is not None else ()):
        impl = module.__dict__.get("_compiled_call_impl")
        if impl is not None:
            def paused(*args, _impl=impl, **kwargs):
                with _disable_current_modes():
                    return _impl(*args, **kwargs)

            module._compiled_call_impl = paused
            patched.append((module, impl))
    try:
        with _SyncFunction(out), _SyncDispatch(out):
            yield out
    finally:
        for module, impl in patched:
            module._compiled_call_impl = impl
