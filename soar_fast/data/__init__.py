"""Training data behind one small protocol, so the trainer does not care where z0 comes from.

A `TrainDataset` has `__len__`, `sample_shape`, `uncond()` (the empty prompt's condition for one
sample) and `batch(indices) -> (z0 [B, ...], cond, labels or None)`. `build_dataset` picks the
source from `DataConfig.source`: 'digits' (embedded default), 'latents' (cached shards) or
'synthetic' (random latents of the model's size). The trainer reads every source through
`BatchStream` (soar_fast.data.loader): a DataLoader over the one resumable, bucket-aware sampler.
"""

from __future__ import annotations

from typing import Any

from soar_fast.config import ConfigError, DataConfig
from soar_fast.data.digits import NUM_CLASSES, DigitsDataset, corrupt_digits, load_digits_tensors
from soar_fast.data.loader import BatchStream, ResumableSampler, default_num_workers

__all__ = ["NUM_CLASSES", "BatchStream", "DigitsDataset", "ResumableSampler", "build_dataset", "corrupt_digits",
           "default_num_workers", "load_digits_tensors"]


def build_dataset(cfg: DataConfig, *, joint_attention_dim: int, pooled_projection_dim: int,
                  latent_channels: int = 0) -> Any:
    """The dataset of `cfg.source`; condition dims (and synthetic latent channels) come from the model."""
    if cfg.source == "digits":
        return DigitsDataset(resolution=cfg.resolution, prompt_tokens=cfg.prompt_tokens,
                             joint_attention_dim=joint_attention_dim,
                             pooled_projection_dim=pooled_projection_dim, embedding_seed=cfg.embedding_seed,
                             label_noise=cfg.label_noise, pixel_noise=cfg.pixel_noise)
    if cfg.source == "latents":
        from soar_fast.data.latents import LatentsDataset

        return LatentsDataset(cfg.data_dir or "", verify_hashes=cfg.verify_shards)
    if cfg.source == "synthetic":
        from soar_fast.data.synthetic import SyntheticLatents

        return SyntheticLatents(num_samples=cfg.num_samples, channels=latent_channels, latent_size=cfg.latent_size,
                                prompt_tokens=cfg.prompt_tokens, joint_attention_dim=joint_attention_dim,
                                pooled_projection_dim=pooled_projection_dim, seed=cfg.embedding_seed,
                                frames=cfg.latent_frames)
    raise ConfigError(f"data.source={cfg.source!r} is invalid: choose 'digits', 'latents' or 'synthetic'")
