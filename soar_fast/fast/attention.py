"""Attention backend as config: torch SDPA (auto or one pinned kernel) or the flash-attn package.

diffusers' SD3 processor (`JointAttnProcessor2_0`) calls `F.scaled_dot_product_attention`
directly, so a pinned SDPA backend is selected with `torch.nn.attention.sdpa_kernel`, and the
flash-attn package is reached by a thin shim that the processor module sees as `F` for the
duration of the forward. A missing package or kernel falls back to SDPA with one log line.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

__all__ = ["attention_context", "flash_attn_available"]

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def _flash_attn_func():
    try:
        from flash_attn_interface import flash_attn_func  # FA3 (Hopper)

        return flash_attn_func
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        pass
    try:
        from flash_attn import flash_attn_func  # FA2

        return flash_attn_func
    except Exception:  # noqa: BLE001
        return None


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and _flash_attn_func() is not None


def _flash_shim(fa_func) -> types.SimpleNamespace:
    """A namespace like torch.nn.functional whose SDPA runs flash-attn ([B, H, S, D] layout)."""

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **kw)
        out = fa_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=is_causal)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    ns = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    ns.scaled_dot_product_attention = sdpa
    return ns


@contextlib.contextmanager
def attention_context(backend: str = "sdpa") -> Iterator[str]:
    """Run the enclosed model forwards with `backend`; yields the backend that actually runs."""
    if backend == "sdpa":
        yield "sdpa"
        return
    if backend.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                  "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[backend]
        if kernel is not SDPBackend.MATH and not torch.cuda.is_available():
            _warn_once(f"attention_backend={backend} needs CUDA; using torch SDPA's default choice")
            yield "sdpa"
            return
        with sdpa_kernel([kernel]):
            yield backend
        return
    if backend == "flash_attn":
        fa = _flash_attn_func() if torch.cuda.is_available() else None
        if fa is None:
            _warn_once("attention_backend=flash_attn: the flash-attn package (or CUDA) is missing; using torch SDPA")
            yield "sdpa"
            return
        from diffusers.models import attention_processor

        saved = attention_processor.F
        attention_processor.F = _flash_shim(fa)
        try:
            yield "flash_attn"
        finally:
            attention_processor.F = saved
        return
    raise ValueError(f"unknown attention backend {backend!r}")
