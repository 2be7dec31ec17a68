"""The rollout engine: SOAR's no-grad CFG forward (one 2B pass: uncond + cond; one B pass with distilled
guidance) at the current weights.

Modes (`FastConfig.rollout`): `eager`; `cuda_graph`, a CUDA graph captured once per input shape
(warm-up on a side stream, static input buffers, replay each step; the graph reads the live
parameters, so in-place optimizer updates are seen); `fp8`, the GEMMs in FP8 (`soar_fast.fast.fp8`),
and `cuda_graph_fp8`, both; `te_fp8`, the GEMMs through Transformer Engine (`soar_fast.fast.te_fp8`;
it falls back to `fp8` without TE >= 2.2 or an SM 8.9+ GPU; TE inside a CUDA graph is not offered).
A mode the machine cannot run falls back with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from soar_fast.fast import te_fp8
from soar_fast.fast.fp8 import enable_fp8_rollout, fp8_rollout, refresh_fp8_weights
from soar_fast.loss.cond import Cond, as_tuple, cat_cond, like

__all__ = ["RolloutEngine"]

log = logging.getLogger(__name__)

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


class RolloutEngine:
    """`engine(z_t [B, ...], sigma0 [B], uncond_b, cond) -> (v_uncond, v_cond)`, no grad.

    `distilled=True`: `velocity_fn` is a distilled-guidance velocity (`ModelFamily.rollout_velocity`);
    the engine runs one B pass of the prompt and returns (v, v), so v_u + g (v_c - v_u) = v.

    `model` is the module whose Linears FP8 mode switches (the transformer behind `velocity_fn`).
    With a CUDA graph the returned tensors are the graph's static outputs: valid until the next
    call. Call `after_optimizer_step()` after each optimizer step (re-quantises FP8 weights; TE
    re-quantises on every call by itself).
    """

    def __init__(self, velocity_fn: VelocityFn, model: nn.Module | None = None, mode: str = "eager",
                 fp8_rowwise: bool = False, warmup_iters: int = 2, distilled: bool = False):
        self.velocity_fn = velocity_fn
        self.distilled = distilled
        self.model = model
        self.requested = mode
        self.use_graph = mode in ("cuda_graph", "cuda_graph_fp8")
        self.use_fp8 = mode in ("fp8", "cuda_graph_fp8")
        self.warmup_iters = warmup_iters
        self._graphs: dict[tuple, _GraphEntry] = {}
        self.captures = 0
        self.te: te_fp8.TeRollout | None = None
        if mode == "te_fp8":
            self.use_fp8 = True  # the fallback, unless TE takes over below
            if model is not None:
                why = te_fp8.te_unavailable_reason(next(model.parameters()).device)
                if why is None:
                    self.te = te_fp8.TeRollout(model)
                    self.use_fp8 = False
                    if not self.te.layers:
                        log.warning("rollout=te_fp8: no Linear layer with sizes divisible by 16; the rollout stays in bf16")
                        self.te = None
                else:
                    log.warning("rollout=te_fp8: %s; running the torch-native fp8 rollout instead "
                                "(fix: %s, on an SM 8.9+ GPU)", why, te_fp8.TE_INSTALL)
        if self.use_fp8:
            if model is None:
                log.warning("rollout=%s needs the model module; running the rollout without FP8", mode)
                self.use_fp8 = False
            else:
                n = enable_fp8_rollout(model, rowwise=fp8_rowwise)
                self.use_fp8 = n > 0
        self._graph_checked = False

    @property
    def mode(self) -> str:
        """The mode that actually runs (after fallbacks)."""
        if self.te is not None:
            return "te_fp8"
        return {(False, False): "eager", (True, False): "cuda_graph", (False, True): "fp8",
                (True, True): "cuda_graph_fp8"}[(self.use_graph, self.use_fp8)]

    def after_optimizer_step(self) -> None:
        if self.use_fp8:
            refresh_fp8_weights(self.model)

    def _forward(self, z: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.te is not None:
            with self.te.active():
                return self.velocity_fn(z, sigma, cond)
        if self.use_fp8:
            with fp8_rollout(self.model):
                return self.velocity_fn(z, sigma, cond)
        return self.velocity_fn(z, sigma, cond)

    @torch.no_grad()
    def __call__(self, z_t: torch.Tensor, sigma0: torch.Tensor, uncond_b: Cond, cond: Cond
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.distilled:
            z2, s2, c2 = z_t, sigma0, cond
        else:
            z2, s2, c2 = torch.cat([z_t, z_t]), torch.cat([sigma0, sigma0]), cat_cond(uncond_b, cond)
        if self.use_graph and not self._graph_checked:
            self._graph_checked = True
            if not z_t.is_cuda:
                log.warning("rollout=%s needs a CUDA device; running the rollout eagerly", self.requested)
                self.use_graph = False
        if not self.use_graph:
            return self._split(self._forward(z2, s2, c2))
        key = (tuple(z2.shape), z2.dtype, tuple((tuple(c.shape), c.dtype) for c in as_tuple(c2)))
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(z2, s2, c2)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager
                log.warning("rollout CUDA graph capture failed (%s); running the rollout eagerly",
                            str(err).splitlines()[0][:200])
                self.use_graph = False
                return self._split(self._forward(z2, s2, c2))
            self._graphs[key] = entry
        entry.z.copy_(z2)
        entry.sigma.copy_(s2)
        for dst, src in zip(entry.cond, as_tuple(c2)):
            dst.copy_(src)
        entry.graph.replay()
        return self._split(entry.out)

    def _split(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (v, v) if self.distilled else v.chunk(2)

    def _capture(self, z: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> _GraphEntry:
        static_z, static_s = z.clone(), sigma.clone()
        static_c = [c.clone() for c in as_tuple(cond)]
        static_cond = like(cond, static_c)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                self._forward(static_z, static_s, static_cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._forward(static_z, static_s, static_cond)
        self.captures += 1
        log.info("rollout: captured a CUDA graph for input shape %s", tuple(z.shape))
        return _GraphEntry(graph, static_z, static_s, static_c, out)


class _GraphEntry:
    def __init__(self, graph, z, sigma, cond, out):
        self.graph, self.z, self.sigma, self.cond, self.out = graph, z, sigma, cond, out
