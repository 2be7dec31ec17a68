"""torchao float8 training GEMMs (`FastConfig.fp8_training_backend="torchao"`), optional.

`torchao.float8.convert_to_float8_training` swaps the same Linears our own `Fp8TrainLinear`
takes (`fp8._eligible`: the blocks' attention/MLP projections, sizes divisible by 16; a LoRA
layer's frozen `base_layer` included) for `Float8Linear`: dynamic e4m3 casts of input and weight,
e5m2 of the output gradient, per tensor (`fp8_scaling="tensorwise"`) or per row ("rowwise", the
recipe torchao reports its 1.3-1.4x H100/H200 LLM gains with). Parameter names, dtypes and
`state_dict` keys stay the stock diffusers ones, so checkpoints and exports are unchanged. The
conversion runs before activation checkpointing, `torch.compile` and FSDP2, the order torchao
documents (`build_train_step`'s fixed order); torchao's float8 all-gather under FSDP2 is not
enabled (the all-gather stays in the compute dtype).

torchao is an optional dependency (`pip install torchao`; the GPU suite carries its wheel). Where
it does not import, or its version lacks `torchao.float8`, `enable_torchao_fp8_training` returns
None after one log line and the caller falls back to our native FP8 linear.

Verified on CPU (torchao 0.18, torch 2.13, where `torch._scaled_mm` runs float8 on the CPU):
which Linears convert, unchanged `state_dict` keys, a SOAR loss curve within 1% of full
precision, the trainer end to end and the fallback (tests/fast/test_torchao_fp8.py). Speed is a
GPU question: the step benchmark's variant `g_ao` (benchmarks/step_lib.py).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from torch import nn

from soar_fast.fast.fp8 import Fp8RolloutLinear, _eligible

__all__ = ["TORCHAO_INSTALL", "enable_torchao_fp8_training", "torchao_float8"]

log = logging.getLogger(__name__)

TORCHAO_INSTALL = "pip install torchao"
_RECIPES = ("tensorwise", "rowwise")  # torchao recipe names, as FastConfig.fp8_scaling spells them


def torchao_float8() -> tuple[ModuleType | None, str]:
    """(`torchao.float8`, "") where it imports, else (None, why)."""
    try:
        return importlib.import_module("torchao.float8"), ""
    except Exception as e:  # noqa: BLE001 - ImportError without torchao; others from a torchao/torch mismatch
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def enable_torchao_fp8_training(model: nn.Module, scaling: str = "tensorwise") -> int | None:
    """Swap the eligible block Linears of `model` for torchao's `Float8Linear` in place; returns
    their count, or None (one log line) where torchao.float8 is unavailable."""
    if scaling not in _RECIPES:
        raise ValueError(f"fp8_scaling={scaling!r} is invalid for torchao: choose one of {_RECIPES}")
    float8, why = torchao_float8()
    if float8 is None:
        log.warning("fp8_training_backend=torchao: torchao.float8 does not import (%s); using the native FP8 "
                    "linear instead (%s)", why, TORCHAO_INSTALL)
        return None
    chosen: set[str] = set()
    for name, module in model.named_modules():
        if type(module) is Fp8RolloutLinear and "blocks." in name:
            module.__class__ = nn.Linear  # an FP8 rollout enabled before: torchao takes the plain Linear
            for attr in ("w_fp8", "w_scale", "fp8_active", "rowwise", "use_scaled_mm"):
                module.__dict__.pop(attr, None)
        if _eligible(name, module):
            chosen.add(name)
    if not chosen:
        return 0
    config = float8.Float8LinearConfig.from_recipe_name(scaling)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda _mod, fqn: fqn in chosen)
    linear = importlib.import_module("torchao.float8.float8_linear").Float8Linear
    n = sum(1 for name, m in model.named_modules() if name in chosen and type(m) is linear)
    log.info("fp8_training_backend=torchao: %d Linear(s) -> torchao Float8Linear (%s scaling)", n, scaling)
    return n
