"""Cached SD3.5 latents + text embeddings (soar_fast.data.shards) behind the `TrainDataset` protocol.

Opening the cache checks it once per run: every shard's shapes and dtypes, and (unless
`DataConfig.verify_shards` is off) every file's sha256 against index.json, so a shard changed on
disk (one flipped byte, same size) is refused before the first step instead of training on
silently wrong data. The hashing runs in threads (hashlib and file reads release the GIL); under
torchrun each rank hashes every W-th file and the ranks agree on the verdict, so all of them
refuse the same shard in the same words.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from soar_fast.config import ConfigError

__all__ = ["LatentsDataset", "text_mask", "verify_cache_hashes"]

log = logging.getLogger(__name__)

REWRITE = ("re-run `soar-fast cache --resume` with the arguments that made this cache (it rewrites the shards "
           "that fail and keeps the rest)")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def verify_cache_hashes(cache_dir: str | Path, index: dict[str, Any], threads: int | None = None) -> None:
    """Collective under torchrun: the sha256 of every shard (and of the empty-prompt and validation files) against
    `index` (the cache's index.json). Raises `ConfigError` naming the first file that fails, the
    same on every rank."""
    from soar_fast.data.shards import file_sha256

    t0 = time.perf_counter()
    root = Path(cache_dir)
    entries = [e for e in [index.get("empty_prompt"), index.get("validation"), *index["shards"]] if e is not None]
    rank, world = _rank_world()
    mine = entries[rank::world]

    def check(e: dict[str, Any]) -> str | None:
        path = root / e["file"]
        try:
            ok = file_sha256(path) == e["sha256"]
        except OSError as err:
            return f"cache shard {path} is unreadable ({err.strerror or type(err).__name__})"
        return None if ok else f"cache shard {path} fails its sha256 checksum in index.json (the file changed on disk)"

    workers = threads or min(8, os.cpu_count() or 1, max(1, len(mine)))
    with ThreadPoolExecutor(workers) as pool:
        bad = [why for why in pool.map(check, mine) if why]
    if world > 1:
        import torch.distributed as dist

        every: list[Any] = [None] * world
        dist.all_gather_object(every, bad)
        bad = [why for part in every for why in part]
    if bad:
        more = f" ({len(bad) - 1} more file(s) fail too)" if len(bad) > 1 else ""
        raise ConfigError(f"{bad[0]}{more}; {REWRITE}")
    size = sum((root / e["file"]).stat().st_size for e in mine)
    log.info("verified the sha256 of %d cache file(s), %.1f MB, in %.1f s (--data.no-verify_shards skips this)",
             len(mine), size / 1e6, time.perf_counter() - t0)


class LatentsDataset:
    """Rows of a latent cache written by `soar_fast.data.cache`; conditions come from the cache.

    `verify_hashes`: check every file's sha256 against index.json on opening (see the module doc);
    shapes and dtypes are checked either way. A damaged cache raises a one-line `ConfigError`.
    """

    num_classes = 0

    def __init__(self, data_dir: str, verify_hashes: bool = True):
        try:
            from soar_fast.data.shards import ShardDataset, ShardError, load_empty_prompt
        except ImportError as e:  # the cache module is built separately
            raise RuntimeError(f"data.source='latents' needs soar_fast.data.shards ({e})") from None
        try:
            self._ds = ShardDataset(data_dir)  # index, shapes and dtypes of every shard
            if verify_hashes:
                verify_cache_hashes(data_dir, self._ds.index)
            uncond = load_empty_prompt(data_dir, check_hash=False)  # hashed above when asked
        except ShardError as e:  # the cache's own one-line reasons, as the CLI's error line
            raise ConfigError(str(e).splitlines()[0]) from None
        self.cache_dir = str(data_dir)
        shapes = sorted(set(self._ds.keys))
        # aspect buckets: a bucket id per row, so the trainer's sampler draws each batch from one bucket
        self.groups = [shapes.index(k) for k in self._ds.keys] if len(shapes) > 1 else None
        # Z-Image / Qwen-Image caches zero-pad prompts and record each one's valid tokens: the condition
        # then carries a third tensor, the text mask (1.0 valid, 0.0 padding), as the pipelines use it
        info = self._ds.index.get("info", {})
        self.masked = "empty_prompt_length" in info and len(self._ds) > 0 and self._ds.prompt_length(0) is not None
        self._uncond = tuple(t.float() for t in uncond)
        if self.masked:
            self._uncond += (text_mask([int(info["empty_prompt_length"])], uncond[0].shape[0])[0],)
        # FLUX.1 Kontext: the reference image's latents are the condition's third tensor; CFG keeps
        # them (the uncond's part is None: each row keeps its own image, `loss.cond.broadcast_uncond`)
        self.has_reference = self._ds.has_reference
        if self.has_reference:
            self._uncond += (None,)

    def __len__(self) -> int:
        return len(self._ds)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of row 0 (with aspect buckets only its channel count is shared by all rows)."""
        return tuple(self._ds[0][0].shape)

    def uncond(self) -> tuple[torch.Tensor | None, ...]:
        """The empty prompt's `(prompt_embeds [L, D], pooled [P][, mask [L]])` (the mask: masked caches;
        a Kontext cache adds None: the reference image is kept, not dropped)."""
        return self._uncond

    @property
    def info(self) -> dict[str, Any]:
        """The producer info of index.json: the pipeline folder, family, VAE normalisation, ..."""
        return dict(self._ds.index.get("info", {}))

    def validation(self) -> tuple[list[str], tuple[torch.Tensor, ...]] | None:
        """The cache's validation prompts `(texts, (prompt_embeds [K, L, D], pooled [K, P][, mask [K, L]]
        [, reference [K, C, h, w]]))` in fp32 (reference: a Kontext cache's input images), or None when it was
        made without `--validation_prompts` (shapes checked here, hashes on opening)."""
        from safetensors import safe_open

        from soar_fast.data.shards import REFERENCE, ShardError, verify_shard

        entry = self._ds.index.get("validation")
        if entry is None:
            return None
        try:
            verify_shard(self.cache_dir, entry, check_hash=False)
        except ShardError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        with safe_open(str(Path(self.cache_dir) / entry["file"]), framework="pt") as f:
            cond = (f.get_tensor("prompt_embeds").float(), f.get_tensor("pooled").float())
            if self.masked:
                k, length = cond[0].shape[:2]
                cond += (text_mask(entry.get("prompt_lengths", [length] * k), length),)
            if REFERENCE in f.keys():  # FLUX.1 Kontext: each validation edit's input image
                cond += (f.get_tensor(REFERENCE).float(),)
        return list(entry["prompts"]), cond

    def batch(self, indices: torch.Tensor):
        rows = [self._ds[int(i)] for i in indices]
        z0 = torch.stack([r[0] for r in rows]).float()
        cond = (torch.stack([r[1] for r in rows]).float(), torch.stack([r[2] for r in rows]).float())
        if self.masked:
            cond += (text_mask([self._ds.prompt_length(int(i)) for i in indices], cond[0].shape[1]),)
        if self.has_reference:
            cond += (torch.stack([self._ds.reference(int(i)) for i in indices]).float(),)
        return z0, cond, None


def text_mask(lengths: list[int], length: int) -> torch.Tensor:
    """`[len(lengths), length]` fp32: 1.0 on each prompt's first `lengths[i]` tokens, 0.0 on its zero padding.
    (Float so every cast of the condition keeps it; the adapters read it as `mask > 0`.)"""
    return (torch.arange(length) < torch.tensor(lengths).view(-1, 1)).float()
