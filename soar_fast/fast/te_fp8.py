"""Transformer Engine FP8 for the no-grad rollout (`FastConfig.rollout="te_fp8"`), optional.

The eligible block Linears (`fp8._eligible`: attention/MLP projections, sizes divisible by 16) get
a `te.Linear` twin that holds the SAME weight/bias Parameters (no copy: in-place optimizer updates
are seen, TE re-quantises the weight on every call). The twins live in a side dict, not as
submodules, so parameters and `state_dict` keys stay the stock diffusers ones. Inside
`TeRollout.active()` the originals forward through their twins (rows zero-padded to a multiple of
8, as TE's FP8 GEMM requires) under one `te.autocast` (TE >= 2.9) or `te.fp8_autocast` with an
e4m3 `Float8CurrentScaling` recipe. TE < 2.2 (no current scaling) is not used: its
`DelayedScaling` updates scales only at an autocast exit with grad enabled, so a no-grad rollout
would keep scale 1 forever; `RolloutEngine` falls back to the torch-native `fp8` mode instead.

Verified (CPU, with a fake `transformer_engine` in `sys.modules`): the wiring (which Linears
route, shared Parameter objects, one autocast per rollout, unchanged `state_dict` keys, weight
updates seen, outputs equal the eager rollout when the fake GEMM is exact) and the fallback to
`fp8`. Not verified: numerics and speed on a real TE, and TE under `torch.compile` or a CUDA graph
(no `cuda_graph_te_fp8` mode is offered): neither our CPU nor our GPU image has TE installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from soar_fast.fast.fp8 import Fp8RolloutLinear, _eligible, has_scaled_mm

__all__ = ["TE_INSTALL", "TeRollout", "te_available", "te_unavailable_reason"]

TE_INSTALL = "pip install --no-build-isolation transformer_engine[pytorch]"
ROW_MULTIPLE = 8  # TE's FP8 GEMM needs the row count (tokens) divisible by 8, K and N by 16


def _te() -> ModuleType | None:
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - ImportError without TE; RuntimeError where TE finds no GPU
        return None


def te_available() -> bool:
    """True where `transformer_engine.pytorch` imports."""
    return _te() is not None


def te_unavailable_reason(device: torch.device) -> str | None:
    """Why the TE rollout cannot run on `device` (None: it can)."""
    why = []
    if not has_scaled_mm(device):
        why.append(f"{device} is not a CUDA GPU with SM 8.9+")
    if not te_available():
        why.append("transformer_engine.pytorch does not import")
    elif not hasattr(importlib.import_module("transformer_engine.common.recipe"), "Float8CurrentScaling"):
        why.append("Transformer Engine < 2.2 has no Float8CurrentScaling recipe")
    return " and ".join(why) or None


def _te_forward(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> [..., N] through a `te.Linear` on a 2-D, row-padded input."""
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1])
    if pad := -rows % ROW_MULTIPLE:  # zero rows leave the per-tensor amax unchanged
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    return linear(x2)[:rows].reshape(*lead, -1)


class TeRollout:
    """TE FP8 twins of `model`'s eligible Linears; `with rollout.active(): model(...)` uses them."""

    def __init__(self, model: nn.Module):
        self.te = _te()
        if self.te is None:
            raise RuntimeError(f"Transformer Engine does not import; install it: {TE_INSTALL}")
        recipe = importlib.import_module("transformer_engine.common.recipe")
        self.recipe = recipe.Float8CurrentScaling(fp8_format=recipe.Format.E4M3)
        self.layers: dict[nn.Linear, nn.Module] = {}
        for name, m in model.named_modules():
            if _eligible(name, m) or type(m) is Fp8RolloutLinear:  # the latter: an fp8 engine came first
                w = m.weight
                twin = self.te.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                      params_dtype=w.dtype, device=w.device)
                self.layers[m] = _tie(m, twin)

    def _autocast(self) -> Any:
        if hasattr(self.te, "autocast"):  # TE >= 2.9 (fp8_autocast is deprecated there)
            return self.te.autocast(enabled=True, recipe=self.recipe)
        return self.te.fp8_autocast(enabled=True, fp8_recipe=self.recipe)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for m, twin in self.layers.items():
            _tie(m, twin)  # again, in case the Parameters were replaced (model.to(), FSDP)
            m.forward = functools.partial(_te_forward, twin)  # instance attribute: no key, no class change
        try:
            with self._autocast():
                yield
        finally:
            for m in self.layers:
                del m.forward  # back to nn.Linear.forward


def _tie(m: nn.Linear, twin: nn.Module) -> nn.Module:
    """Point the twin's weight/bias at the original's Parameters (the same objects)."""
    if twin.weight is not m.weight:
        twin.weight = m.weight
    if m.bias is not None and twin.bias is not m.bias:
        twin.bias = m.bias
    return twin
