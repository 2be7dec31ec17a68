"""Loader of the optional native extension (kernels/): `libsoar_fast_native.so`, which registers
`torch.ops.soar_fast_native.{aux_states, aux_states_z, fused_mse, fused_mse_backward,
fused_mse_and_grad}` (CPU C++;
CUDA when built against a CUDA torch with nvcc). Build it with

    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j
    (or SOAR_FAST_BUILD_NATIVE=1 pip install -e .)

It is looked up at $SOAR_FAST_NATIVE_LIB, then build/kernels/ and build/ of the source tree, then
next to this file (`_native/`, where the setup.py flag puts it). Nothing is loaded at import time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

__all__ = ["LIB_NAME", "candidate_paths", "load_native", "native_available"]

log = logging.getLogger(__name__)
LIB_NAME = "libsoar_fast_native.so"
ENV_LIB = "SOAR_FAST_NATIVE_LIB"
_state: dict[str, object] = {"loaded": None, "error": None}


def candidate_paths() -> list[Path]:
    root = Path(__file__).resolve().parents[2]
    paths = [
        root / "build" / "kernels" / LIB_NAME,
        root / "build" / LIB_NAME,
        Path(__file__).parent / "_native" / LIB_NAME,
    ]
    env = os.environ.get(ENV_LIB)
    return ([Path(env)] if env else []) + paths


def load_native(path: str | os.PathLike | None = None) -> Path:
    """Load the extension once (from `path` or the first candidate that exists); return its path.
    Raises RuntimeError with build instructions when it cannot be found or loaded."""
    if _state["loaded"] is not None:
        return _state["loaded"]  # type: ignore[return-value]
    tried = [Path(path)] if path is not None else candidate_paths()
    for p in tried:
        if p.is_file():
            torch.ops.load_library(str(p))
            _register_python_side()
            _state["loaded"] = p
            log.info("soar_fast.ops: loaded the native extension from %s", p)
            return p
    raise RuntimeError(
        "soar_fast.ops: the native extension is not built (looked at "
        + ", ".join(str(p) for p in tried)
        + "). Build it with `cmake -S . -B build && cmake --build build -j` or set "
        + f"{ENV_LIB} to the path of {LIB_NAME}."
    )


def native_available() -> bool:
    try:
        load_native()
    except (RuntimeError, OSError) as e:
        _state["error"] = str(e)
        return False
    return True


def native_cuda_ready() -> bool:
    """True when the extension loads and was built with its CUDA kernels (not the CPU-only build).
    After one failed look it answers False without probing the file system again (it sits on the
    eager hot path of `backend="auto"`); an explicit `load_native(path)` later still counts."""
    if _state["loaded"] is None and _state["error"] is not None:
        return False
    return native_available() and torch.ops.soar_fast_native.aux_states.default.has_kernel_for_dispatch_key("CUDA")


def _register_python_side() -> None:
    """Fake impls and autograd for the C++ ops, so they compile as single nodes like the Triton ones."""
    ns = "soar_fast_native"

    def out(z0, sigma_aux):
        return z0.new_empty((sigma_aux.shape[0] * z0.shape[0], *z0.shape[1:]))

    @torch.library.register_fake(f"{ns}::aux_states")
    def _(z0, z1, vu, vc, s0, s1, sa, g):
        return out(z0, sa), out(z0, sa)

    @torch.library.register_fake(f"{ns}::aux_states_z")
    def _(z0, z1, vu, vc, s0, s1, sa, g):
        return out(z0, sa)

    @torch.library.register_fake(f"{ns}::fused_mse")
    def _(v, z0, z1, za, sa, w):
        return v.new_empty((v.shape[0],), dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::fused_mse_backward")
    def _(grad, v, z0, z1, za, sa, w):
        return torch.empty_like(v, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{ns}::fused_mse_and_grad")
    def _(v, z0, z1, za, sa, w):
        return v.new_empty((v.shape[0],), dtype=torch.float32), torch.empty_like(
            v, memory_format=torch.contiguous_format
        )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        v, z0, z1, za, sa, w = ctx.saved_tensors
        gv = torch.ops.soar_fast_native.fused_mse_backward(grad.contiguous(), v, z0, z1, za, sa, w)
        return gv, None, None, None, None, None

    torch.library.register_autograd(f"{ns}::fused_mse", backward, setup_context=setup_context)
