"""Synthetic latents: random z0 and text embeddings, a pure function of (seed, row). For the step
benchmark's end-to-end run (`soar-fast train --data.source synthetic`, real model sizes without a
dataset) and the multi-rank tests; nothing downloaded, nothing cached."""

from __future__ import annotations

import torch

__all__ = ["SyntheticLatents"]


class SyntheticLatents:
    """Row i: z0 `[C, S, S]` (or `[C, F, S, S]` with `frames` >= 1: video), prompt_embeds `[L, D]`,
    pooled `[P]`, from a generator seeded by (seed, i); the empty prompt is zeros. The
    `TrainDataset` protocol of soar_fast.data."""

    num_classes = 0

    def __init__(self, *, num_samples: int, channels: int, latent_size: int, prompt_tokens: int,
                 joint_attention_dim: int, pooled_projection_dim: int, seed: int, frames: int = 0):
        self.n, self.seed = num_samples, seed
        self.shape = (channels, *((frames,) if frames else ()), latent_size, latent_size)
        self.text = (prompt_tokens, joint_attention_dim)
        self.pooled = pooled_projection_dim

    def __len__(self) -> int:
        return self.n

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.text), torch.zeros(self.pooled)

    def _row(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        return torch.randn(self.shape, generator=g), torch.randn(self.text, generator=g), torch.randn(self.pooled, generator=g)

    def batch(self, indices: torch.Tensor):
        rows = [self._row(int(i)) for i in indices]
        z0 = torch.stack([r[0] for r in rows])
        return z0, (torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])), None
