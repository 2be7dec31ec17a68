"""Cached SD3.5 latents + text embeddings (soar_fast.data.shards) behind the `TrainDataset` protocol."""

from __future__ import annotations

import torch

__all__ = ["LatentsDataset"]


class LatentsDataset:
    """Rows of a latent cache written by `soar_fast.data.cache`; conditions come from the cache."""

    num_classes = 0

    def __init__(self, data_dir: str):
        try:
            from soar_fast.data.shards import ShardDataset, load_empty_prompt
        except ImportError as e:  # the cache module is built separately
            raise RuntimeError(f"data.source='latents' needs soar_fast.data.shards ({e})") from None
        self._ds = ShardDataset(data_dir)
        shapes = sorted(set(self._ds.keys))
        # aspect buckets: a bucket id per row, so the trainer's sampler draws each batch from one bucket
        self.groups = [shapes.index(k) for k in self._ds.keys] if len(shapes) > 1 else None
        self._uncond = tuple(t.float() for t in load_empty_prompt(data_dir))

    def __len__(self) -> int:
        return len(self._ds)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of row 0 (with aspect buckets only its channel count is shared by all rows)."""
        return tuple(self._ds[0][0].shape)

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._uncond

    def batch(self, indices: torch.Tensor):
        rows = [self._ds[int(i)] for i in indices]
        z0 = torch.stack([r[0] for r in rows]).float()
        cond = (torch.stack([r[1] for r in rows]).float(), torch.stack([r[2] for r in rows]).float())
        return z0, cond, None
