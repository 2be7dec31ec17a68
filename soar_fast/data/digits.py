"""The embedded default data: sklearn's 1,797 real 8x8 handwritten digits, class-conditional.

Pixels are the latents (no VAE): values 0..16 are scaled to [-1, 1], optionally upsampled. Each
class c gets a fixed random "prompt embedding" (prompt_embeds `[L, D]`, pooled `[P]`) and the empty
prompt its own (row `NUM_CLASSES`), so training exercises the same MMDiT conditioning path
(encoder_hidden_states, pooled_projections) as SD3.5.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NUM_CLASSES", "DigitsDataset", "corrupt_digits", "load_digits_tensors"]

NUM_CLASSES = 10


def load_digits_tensors(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images `[N, 1, R, R]` fp32 in [-1, 1], labels `[N]` int64)."""
    from sklearn.datasets import load_digits  # reads a file shipped in the package: no download

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.contiguous(), torch.from_numpy(d.target.astype(np.int64))


def corrupt_digits(images: torch.Tensor, labels: torch.Tensor, label_noise: float, pixel_noise: float, *,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed "web" copy of the digits: a `label_noise` fraction of rows relabelled to a uniformly
    drawn other class, and Gaussian noise of std `pixel_noise` on every pixel, clamped to [-1, 1].
    The same seed gives the same copy (a dataset, not an augmentation)."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape, generator=g) < label_noise
    other = (labels + torch.randint(1, NUM_CLASSES, labels.shape, generator=g)) % NUM_CLASSES
    noise = torch.randn(images.shape, generator=g) * pixel_noise
    return (images + noise).clamp(-1, 1), torch.where(flip, other, labels)


class DigitsDataset:
    """Digits with fixed class prompt embeddings; the `TrainDataset` protocol of soar_fast.data."""

    def __init__(self, *, resolution: int, prompt_tokens: int, joint_attention_dim: int,
                 pooled_projection_dim: int, embedding_seed: int, label_noise: float = 0.0,
                 pixel_noise: float = 0.0):
        self.images, self.labels = load_digits_tensors(resolution)
        if label_noise or pixel_noise:
            self.images, self.labels = corrupt_digits(self.images, self.labels, label_noise, pixel_noise,
                                                      seed=embedding_seed + 1)
        g = torch.Generator().manual_seed(embedding_seed)
        # Unit-variance entries, like normalised text-encoder features; row NUM_CLASSES = empty prompt.
        self.prompt_table = torch.randn(NUM_CLASSES + 1, prompt_tokens, joint_attention_dim, generator=g)
        self.pooled_table = torch.randn(NUM_CLASSES + 1, pooled_projection_dim, generator=g)
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds `[B, L, D]`, pooled `[B, P]`) of class labels `[B]` (NUM_CLASSES = empty)."""
        return self.prompt_table[labels], self.pooled_table[labels]

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's condition for one sample: (`[L, D]`, `[P]`)."""
        return self.prompt_table[NUM_CLASSES], self.pooled_table[NUM_CLASSES]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(z0 `[B, 1, R, R]`, cond, labels `[B]`) of dataset rows `indices`."""
        labels = self.labels[indices]
        return self.images[indices], self.condition(labels), labels
