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

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
EPS = 1e-12


def has_scaled_mm(device: torch.device) -> bool:
    """True where `torch._scaled_mm` runs FP8 on this device (CUDA compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_fp8(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (x_fp8 [R, K], scale) with x ≈ x_fp8 · scale; scale is [] or [R, 1], fp32."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if rowwise else x32.abs().amax()
    scale = amax.clamp_min(EPS) / FP8_MAX
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


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
def refresh_fp8_weights(model: nn.Module, group: int = 32) -> None:
    """Re-quantise every FP8 weight copy from the live weights (once per optimizer step).

    Per-tensor scales go through multi-tensor (`_foreach`) kernels, `group` weights at a time:
    one amax pass, then scale, clamp and cast, each one launch per group, with the scaled copy in
    the weights' own dtype (bounded by `group` weights). For fp32 weights this equals the per-layer
    `quantize_fp8` bitwise; for bf16 weights the scaling rounds to bf16 before the cast to e4m3, so
    an element can land one e4m3 step from the fp32 path (a double rounding). On an H200
    (SD3.5-Medium, 337 layers, 2026-11-26) it took 41.9 ms timed alone, launch-bound like the
    per-layer version (40.5 ms), but added 18.5 ms to a step against the per-layer 81 ms."""
    layers = [m for m in model.modules() if isinstance(m, Fp8RolloutLinear)]
    fused, single = [], []
    for m in layers:
        grouped = (not m.rowwise and m.w_fp8 is not None and m.w_fp8.shape == m.weight.shape
                   and m.w_fp8.device == m.weight.device)
        (fused if grouped else single).append(m)
    for m in single:
        m.refresh()  # row-wise scales, or no FP8 copy yet: the per-layer path
    for i in range(0, len(fused), group):
        chunk = fused[i : i + group]
        for dtype in {m.weight.dtype for m in chunk}:
            same = [m for m in chunk if m.weight.dtype == dtype]
            try:
                _refresh_group(same)
            except RuntimeError as err:  # a multi-tensor op this torch build lacks: per layer
                log.warning("FP8 refresh: grouped path failed (%s); quantising per layer", str(err).splitlines()[0][:160])
                for m in same:
                    m.refresh()


def _refresh_group(layers: list[Fp8RolloutLinear]) -> None:
    weights = [m.weight.detach() for m in layers]
    amax = torch._foreach_norm(weights, float("inf"))  # fp32 for fp32 weights, else weight dtype
    scales = [a.float().clamp_min(EPS) / FP8_MAX for a in amax]
    scaled = torch._foreach_div(weights, [s.to(w.dtype) for s, w in zip(scales, weights)])
    torch._foreach_clamp_min_(scaled, -FP8_MAX)
    torch._foreach_clamp_max_(scaled, FP8_MAX)
    torch._foreach_copy_([m.w_fp8 for m in layers], scaled)  # the cast to e4m3, in place (CUDA graphs)
    torch._foreach_copy_([m.w_scale for m in layers], scales)
    for m in layers:
        m.use_scaled_mm = has_scaled_mm(m.weight.device)


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


def enable_fp8_training(model: nn.Module) -> int:
    """Switch the blocks' attention/MLP Linears to `Fp8TrainLinear` (the rollout then runs FP8 too)."""
    n = 0
    for name, module in model.named_modules():
        if _eligible(name, module) or (type(module) is Fp8RolloutLinear and "blocks." in name):
            module.__class__ = Fp8TrainLinear
            module.use_scaled_mm = has_scaled_mm(module.weight.device)
            n += 1
    return n
