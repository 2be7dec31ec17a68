"""`FastConfig`: which fast path runs a SOAR step. Every option has an eager fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soar_fast.config.errors import ConfigError

RolloutMode = Literal["eager", "cuda_graph", "fp8", "cuda_graph_fp8", "te_fp8"]
AttentionBackend = Literal["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn"]
Fp8Scaling = Literal["tensorwise", "rowwise"]

ROLLOUT_MODES = ("eager", "cuda_graph", "fp8", "cuda_graph_fp8", "te_fp8")
ATTENTION_BACKENDS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn")
OPS_BACKENDS = ("auto", "reference", "triton", "native")


@dataclass(kw_only=True)
class FastConfig:
    """How a training step runs: the batched step's options (`--runtime.step fast`: micro-chunks,
    rollout mode, fused-op backend, attention) and the model converters of every step (FP8
    training GEMMs, activation checkpointing, compile), all composable at any world size."""

    micro_chunks: int = 1
    """Split the (1+M)B batch into this many sample groups, each run forward+backward alone."""
    rollout: RolloutMode = "eager"
    """No-grad CFG rollout: eager, a CUDA graph, FP8 GEMMs, a CUDA graph of the FP8 rollout, or
    Transformer Engine FP8 GEMMs (te_fp8; falls back to fp8 without TE >= 2.2 on an SM 8.9+ GPU)."""
    fp8_scaling: Fp8Scaling = "tensorwise"
    """FP8 scale granularity for the rollout GEMMs: one scale per tensor or per row/column."""
    fp8_training: bool = False
    """Also run the training GEMMs in FP8 (e4m3 forward, e5m2 grads), through `fp8_training_backend`."""
    fp8_training_backend: Literal["native", "torchao"] = "native"
    """FP8 training library: 'native', our torch._scaled_mm linear; 'torchao', torchao.float8's
    `convert_to_float8_training` (scaling from `fp8_scaling`), falling back to native with one log
    line where torchao is not installed."""
    ops_backend: str = "auto"
    """Backend of the fused ops: auto (on CUDA native if built, else Triton; else reference), reference,
    triton, native."""
    compile: Literal["none", "per_block", "full"] = "none"
    """torch.compile of the model: per transformer block (torchtitan style) or the whole forward;
    applied after activation checkpointing and before FSDP2, at any world size."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (non-reentrant checkpoint per
    block): less activation memory for about one more forward of compute."""
    attention_backend: AttentionBackend = "sdpa"
    """Attention kernel: torch SDPA (auto), a pinned SDPA backend, or the flash-attn package."""

    def __post_init__(self) -> None:
        if not isinstance(self.micro_chunks, int) or self.micro_chunks < 1:
            raise ConfigError(f"FastConfig.micro_chunks={self.micro_chunks!r} is invalid: need an integer >= 1")
        if self.rollout not in ROLLOUT_MODES:
            raise ConfigError(f"FastConfig.rollout={self.rollout!r} is invalid: choose one of {', '.join(ROLLOUT_MODES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"FastConfig.attention_backend={self.attention_backend!r} is invalid: "
                f"choose one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.ops_backend not in OPS_BACKENDS:
            raise ConfigError(f"FastConfig.ops_backend={self.ops_backend!r} is invalid: choose one of {', '.join(OPS_BACKENDS)}")
        if self.compile not in ("none", "per_block", "full"):
            raise ConfigError(f"FastConfig.compile={self.compile!r} is invalid: choose none, per_block or full")
        if self.fp8_training_backend not in ("native", "torchao"):
            raise ConfigError(f"FastConfig.fp8_training_backend={self.fp8_training_backend!r} is invalid: "
                              "choose native or torchao")
        if self.fp8_scaling not in ("tensorwise", "rowwise"):
            raise ConfigError(f"FastConfig.fp8_scaling={self.fp8_scaling!r} is invalid: choose tensorwise or rowwise")
