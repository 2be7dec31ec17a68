"""FP8 GEMMs for the no-grad rollout: `torch._scaled_mm` on Hopper/Ada, exact emulation elsewhere.

The rollout runs the same module as training. Eligible `nn.Linear`s are switched (by class, so
their parameters and `state_dict` keys stay the stock diffusers ones) to `Fp8RolloutLinear`,
which keeps an FP8 (e4m3) copy of its weight plus scales. `refresh_fp8_weights` re-quantises
that copy from the live bf16/fp32 weight, once per optimizer step; inside `fp8_rollout(model)`
forwards use the FP8 copy, everywhere else the module is a plain `nn.Linear`.

Numerics: activations are quantised per tensor (or per row) with a dynamic amax scale, weights
per tensor (or per output row); the GEMM accumulates in fp32 and writes the input dtype. Where
`torch._scaled_mm` is unavailable (CPU, pre-SM89 GPUs), the same quantise-dequantise math runs
in fp32, so the FP8 error can be measured on any machine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from soar_fast.ops.fp8_quant import fp8_quantize_many
from soar_fast.ops.fp8_quant.reference import EPS, FP8_DTYPE, FP8_MAX
from soar_fast.ops.fp8_quant.reference import quantize_fp8_reference as quantize_fp8

__all__ = [
    "FP8_DTYPE",
    "Fp8RolloutLinear",
    "Fp8TrainLinear",
    "enable_fp8_rollout",
    "enable_fp8_training",
    "fp8_rollout",
    "has_scaled_mm",
    "quantize_fp8",
    "refresh_fp8_weights",
]

log = logging.getLogger(__name__)


def has_scaled_mm(device: torch.device) -> bool:
    """True where `torch._scaled_mm` runs FP8 on this device (CUDA compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8RolloutLinear(nn.Linear):
    """An `nn.Linear` with an FP8 weight copy used only inside `fp8_rollout` (same parameters)."""

    fp8_active: bool = False
    rowwise: bool = False
    use_scaled_mm: bool = False
    w_fp8: torch.Tensor | None = None
    w_scale: torch.Tensor | None = None

    def refresh(self) -> None:
        """Re-quantise the FP8 weight from the live weight (call after each optimizer step)."""
        # Decided here, outside any compiled region, so the forward reads a plain attribute.
        self.use_scaled_mm = has_scaled_mm(self.weight.device)
        with torch.no_grad():
            w_fp8, w_scale = quantize_fp8(self.weight.detach(), self.rowwise)  # [N, K], [N, 1] or []
        if self.w_fp8 is not None and self.w_fp8.shape == w_fp8.shape and self.w_fp8.device == w_fp8.device:
            # copy in place so a captured CUDA graph keeps reading the same buffers
            self.w_fp8.copy_(w_fp8)
            self.w_scale.copy_(w_scale)
        else:
            self.w_fp8, self.w_scale = w_fp8, w_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_active:
            return super().forward(x)
        if self.w_fp8 is None:
            self.refresh()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        x_fp8, x_scale = quantize_fp8(x2, self.rowwise)
        bias = self.bias
        if self.use_scaled_mm and x.is_cuda:
            w_scale = self.w_scale.view(1, -1) if self.rowwise else self.w_scale
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            # fast accumulation in the forward, as torchao's float8 recipes do
            y = torch._scaled_mm(
                x_fp8, self.w_fp8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype,
                bias=None if bias is None else bias.to(out_dtype), use_fast_accum=True,
            )
        else:  # exact emulation: dequantise, fp32 GEMM
            w = self.w_fp8.float() * self.w_scale
            y = F.linear(x_fp8.float() * x_scale, w, None if bias is None else bias.float())
        return y.to(x.dtype).reshape(*lead, -1)


# The adaLN modulation (`norm*.linear`), embedders and the output projection steer every token's
# scale and shift: FP8 there costs accuracy for few FLOPs, so (as common FP8 recipes do) only the
# attention and MLP projections inside the blocks run in FP8.
_SKIP = ("norm", "embed", "proj_out")


def _eligible(name: str, module: nn.Module) -> bool:
    # _scaled_mm needs K and N multiples of 16
    return (
        type(module) is nn.Linear
        and "blocks." in name
        and not any(s in name for s in _SKIP)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def enable_fp8_rollout(model: nn.Module, rowwise: bool = False) -> int:
    """Switch eligible Linears of `model` to `Fp8RolloutLinear` in place; returns their count."""
    n = 0
    for name, module in model.named_modules():
        if _eligible(name, module) or type(module) is Fp8RolloutLinear:  # the latter: enabled before
            module.__class__ = Fp8RolloutLinear
            if module.rowwise != rowwise:
                module.rowwise, module.w_fp8 = rowwise, None  # other scale shapes: quantise anew
            n += 1
    refresh_fp8_weights(model)
    if n == 0:
        log.warning("FP8 rollout: no Linear layer with sizes divisible by 16; the rollout stays in bf16")
    return n


@torch.no_grad()
def refresh_fp8_weights(model: nn.Module, backend: str = "auto") -> str:
    """Re-quantise every FP8 weight copy from the live weights (once per optimizer step), in place
    (a captured CUDA graph keeps reading the same buffers).

    All layers go through `soar_fast.ops.fp8_quant.fp8_quantize_many`: on CUDA (and under
    TRITON_INTERPRET) 3 Triton launches for every per-tensor-scaled weight of the model, 1 for
    per-row scales, instead of ~4 per layer (337 layers in SD3.5-Medium, launch-bound: 41.9 ms on
    an H200, 2026-11-26); elsewhere the reference, layer by layer. Both equal `quantize_fp8` per
    layer bitwise. Returns the backend that ran."""
    layers = [m for m in model.modules() if isinstance(m, Fp8RolloutLinear)]
    ready = [m for m in layers if m.w_fp8 is not None and m.w_fp8.shape == m.weight.shape
             and m.w_fp8.device == m.weight.device and m.weight.is_contiguous()]
    for m in layers:
        if m not in ready:
            m.refresh()  # no FP8 copy yet (or a new shape): allocates it
    ran = "reference"
    for rowwise in (False, True):
        group = [m for m in ready if m.rowwise == rowwise]
        if not group:
            continue
        try:
            ran = fp8_quantize_many([m.weight.detach() for m in group], [m.w_fp8 for m in group],
                                    [m.w_scale for m in group], rowwise=rowwise, backend=backend)
        except (RuntimeError, ValueError) as err:  # a kernel that does not build here: per layer
            log.warning("FP8 refresh: fused path failed (%s); quantising per layer", str(err).splitlines()[0][:160])
            for m in group:
                m.refresh()
        for m in group:
            m.use_scaled_mm = has_scaled_mm(m.weight.device)
    return ran


@contextlib.contextmanager
def fp8_rollout(model: nn.Module) -> Iterator[None]:
    """Inside this context the model's `Fp8RolloutLinear`s compute with their FP8 weights."""
    layers = [m for m in model.modules() if isinstance(m, Fp8RolloutLinear)]
    for m in layers:
        m.fp8_active = True
    try:
        yield
    finally:
        for m in layers:
            m.fp8_active = False


# ---------------------------------------------------------------------------------------------
# FP8 training GEMMs (variant g of the step benchmark): forward in e4m3, gradients in e5m2.

FP8_GRAD_DTYPE = torch.float8_e5m2
FP8_GRAD_MAX = torch.finfo(FP8_GRAD_DTYPE).max


def _quant(x: torch.Tensor, dtype: torch.dtype, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    scale = x32.abs().amax().clamp_min(EPS) / fmax
    return (x32 / scale).clamp(-fmax, fmax).to(dtype), scale


def _pad_k(x8: torch.Tensor, k: int) -> torch.Tensor:
    """[R, K] -> [R, k] with zero columns (an FP8 zero is exact: padded products add nothing)."""
    if x8.shape[1] == k:
        return x8
    out = x8.new_zeros(x8.shape[0], k)
    out[:, : x8.shape[1]] = x8
    return out


def _mm(a8: torch.Tensor, sa: torch.Tensor, b8_t: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
        scaled_mm: bool, fast_accum: bool = False) -> torch.Tensor:
    """a [R, K] (row-major) @ b [K, N] given as b8_t = bᵀ [N, K] row-major; fp32 accumulate.

    `torch._scaled_mm` needs K a multiple of 16: K is zero-padded (the weight-gradient GEMM
    contracts over tokens, and a text stream of (1+M)·B·154 rows is not). The emulation pads too,
    so CPU tests cover that path."""
    k = -(-a8.shape[1] // 16) * 16
    a8, b8_t = _pad_k(a8, k), _pad_k(b8_t, k)
    if scaled_mm:
        return torch._scaled_mm(a8, b8_t.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return ((a8.float() * sa) @ (b8_t.float() * sb).t()).to(out_dtype)


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, scaled_mm):
        out_dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.float32
        if scaled_mm and out_dtype == torch.float32:
            out_dtype = torch.bfloat16
        x8, sx = _quant(x2, FP8_DTYPE, FP8_MAX)
        w8, sw = _quant(weight, FP8_DTYPE, FP8_MAX)
        ctx.save_for_backward(x8, sx, w8, sw)
        ctx.dtypes = (x2.dtype, weight.dtype)
        ctx.scaled_mm = scaled_mm
        return _mm(x8, sx, w8, sw, out_dtype, scaled_mm, fast_accum=True).to(x2.dtype)

    @staticmethod
    def backward(ctx, grad):
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        scaled_mm = ctx.scaled_mm
        g8, sg = _quant(grad, FP8_GRAD_DTYPE, FP8_GRAD_MAX)
        out = torch.bfloat16 if scaled_mm else torch.float32
        grad_x = _mm(g8, sg, w8.t().contiguous(), sw, out, scaled_mm)  # [R, N] @ [N, K]
        grad_w = _mm(g8.t().contiguous(), sg, x8.t().contiguous(), sx, out, scaled_mm)  # [N, R] @ [R, K]
        return grad_x.to(x_dtype), grad_w.to(w_dtype), None


class Fp8TrainLinear(nn.Linear):
    """An `nn.Linear` whose GEMMs (forward and both backward GEMMs) run in FP8 with per-tensor
    dynamic scales; the weight stays in its own dtype (master copy), parameters and keys unchanged."""

    use_scaled_mm: bool = False  # set by enable_fp8_training, outside any compiled region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _Fp8LinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.use_scaled_mm and x.is_cuda)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, -1)


def enable_fp8_training(model: nn.Module, backend: str = "native", scaling: str = "tensorwise") -> int:
    """Switch the blocks' attention/MLP Linears to `Fp8TrainLinear` (the rollout then runs FP8 too);
    `backend="torchao"`: torchao.float8 instead (`soar_fast.fast.torchao_fp8`). Returns the count."""
    if backend == "torchao":
        from soar_fast.fast.torchao_fp8 import enable_torchao_fp8_training

        n = enable_torchao_fp8_training(model, scaling=scaling)
        if n is not None:  # None: torchao unavailable, fell back (one log line) to ours
            return n
    n = 0
    for name, module in model.named_modules():
        if _eligible(name, module) or (type(module) is Fp8RolloutLinear and "blocks." in name):
            module.__class__ = Fp8TrainLinear
            module.use_scaled_mm = has_scaled_mm(module.weight.device)
            n += 1
    return n
