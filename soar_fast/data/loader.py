"""A resumable batch stream: the data position is one integer, so a checkpoint restores it exactly.

The stream is the concatenation of per-epoch permutations; epoch e's permutation comes from a
generator seeded with (seed, e), so no RNG state has to be saved, only `position` (samples drawn).

Data parallel: with `world_size` W each call consumes one global batch of W·batch_size rows of
the stream and rank r gets rows [r·batch_size, (r+1)·batch_size) of it: disjoint shards, and the
union over ranks is exactly the batch a single process with batch_size·W would draw. `position`
counts global samples, so a checkpoint resumes at any world size.

Buckets (aspect-bucketed latent caches): with `groups` (a bucket id per row) every global batch
comes from one bucket. Epoch e permutes each bucket's rows, cuts them into global batches (a
bucket's remainder smaller than a global batch waits for a later epoch's permutation) and
shuffles the order of those batches, all from the (seed, e) generator; the position still counts
samples, so resume stays exact (at the same global batch size).

`BatchStream` is how the trainer reads every source (digits, synthetic, latent caches): a
`torch.utils.data.DataLoader` whose batch sampler walks a copy of the sampler from the position
the trainer has consumed, whose workers run the dataset's `batch(indices)` (the collate step) with
pinned memory and prefetch, and which hands each batch back with the stream position after it.
The trainer's sampler follows what it consumed, not what workers prefetched, so its `position` is
what a checkpoint stores; a position set from outside (a resume) restarts the workers there.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import torch

from soar_fast.config import ConfigError

__all__ = ["BatchStream", "ResumableSampler", "default_num_workers"]


class ResumableSampler:
    """Yields index batches `[batch_size]` of a dataset of `n` rows, epoch after epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, position: int = 0, rank: int = 0, world_size: int = 1,
                 groups: list[int] | None = None):
        if n < 1:
            raise ValueError("the dataset is empty: add data or pick another data.source")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size * world_size > n:  # a batch would hold some rows twice
            raise ConfigError(f"the global batch ({batch_size} per rank x {world_size} rank(s)) is larger than the "
                              f"dataset ({n} rows): lower --train_batch_size or add data")
        self.n, self.batch_size, self.seed, self.position = n, batch_size, seed, position
        self.rank, self.world_size = rank, world_size
        self.groups = None if groups is None or len(set(groups)) < 2 else torch.as_tensor(groups)
        if groups is not None and len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for a dataset of {n} rows")
        self.epoch_len = n
        if self.groups is not None:
            chunk = batch_size * world_size
            counts = torch.bincount(self.groups)
            self.epoch_len = int((counts // chunk).sum()) * chunk
            if self.epoch_len == 0:
                raise ConfigError(f"no aspect bucket holds a full global batch of {chunk} rows: lower "
                                 "--train_batch_size or cache without --data.aspect_buckets")
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            if self.groups is not None:
                perm = self._bucket_stream(perm, g)
            self._perm = (epoch, perm)
        return self._perm[1]

    def _bucket_stream(self, perm: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The epoch's rows as whole global batches, each from one bucket, in shuffled order."""
        chunk = self.batch_size * self.world_size
        batches = []
        for bucket in torch.unique(self.groups).tolist():
            rows = perm[self.groups[perm] == bucket]
            full = rows.numel() // chunk * chunk
            batches.extend(rows[:full].split(chunk))
        order = torch.randperm(len(batches), generator=g)
        return torch.cat([batches[i] for i in order.tolist()])

    def next_indices(self) -> torch.Tensor:
        """The next `batch_size` row indices (this rank's slice of the global batch); wraps into
        the next epoch's permutation."""
        if self.world_size > 1:
            rows = self._take(self.batch_size * self.world_size)
            return rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self._take(self.batch_size)

    def _take(self, need: int) -> torch.Tensor:
        out = []
        while need:
            epoch, offset = divmod(self.position, self.epoch_len)
            take = min(need, self.epoch_len - offset)
            out.append(self._permutation(epoch)[offset:offset + take])
            self.position += take
            need -= take
        return torch.cat(out)

    @property
    def epoch(self) -> float:
        return self.position / self.epoch_len

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n:
            raise ValueError(f"checkpoint was written for a dataset of {state.get('n')} rows, this one has {self.n}")
        self.position = int(state["position"])


def default_num_workers(source: str) -> int:
    """DataLoader workers when `--data.num_workers` is unset: min(4, usable CPUs) for cached latents
    (shard reads and the bf16 -> fp32 casts overlap the step), 0 for the in-memory sources."""
    if source != "latents":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus)


class _Ahead(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: from a copy of `sampler` taken when an epoch of the loader
    starts (at the consumed position), one item per batch: `[(position after it, indices)]`."""

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        return self._walk(copy.copy(self.sampler))  # copied now, not at the first next()

    @staticmethod
    def _walk(s: ResumableSampler) -> Iterator[list[tuple[int, torch.Tensor]]]:
        while True:
            idx = s.next_indices()
            yield [(s.position, idx)]


class _Batches(torch.utils.data.Dataset):
    """Item `(position, indices)` -> `(position, indices, dataset.batch(indices))`, run in the workers."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, torch.Tensor]) -> tuple[int, torch.Tensor, Any]:
        position, idx = item
        return position, idx, self.dataset.batch(idx)


def _only(items: list[Any]) -> Any:
    """collate_fn: `dataset.batch` already built the batch (module level, so it pickles)."""
    return items[0]


class BatchStream:
    """`next(stream)` -> `(indices [B], dataset.batch(indices))`: this rank's batches of `sampler`, in its order.

    `sampler` is the trainer's `ResumableSampler`; its `position` advances as batches are consumed.
    `num_workers` 0 reads in the calling process (the same code path); > 0 forks worker processes
    that prefetch `prefetch_factor` batches each (they open cache shards lazily, per process).
    `pin_memory` pins the batches for asynchronous copies to a CUDA device.
    """

    def __init__(self, dataset: Any, sampler: ResumableSampler, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2, persistent_workers: bool = True):
        self.sampler = sampler
        workers = num_workers > 0
        self.loader = torch.utils.data.DataLoader(
            _Batches(dataset), batch_sampler=_Ahead(sampler), collate_fn=_only, num_workers=num_workers,
            pin_memory=pin_memory, prefetch_factor=prefetch_factor if workers else None,
            persistent_workers=persistent_workers and workers)
        self._it: Iterator[Any] | None = None
        self._at = -1  # the sampler position the running iterator continues from

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, Any]:
        if self._it is None or self._at != self.sampler.position:  # first batch, or a resume moved it
            self._it = iter(self.loader)  # drops what workers prefetched for the old position
        position, idx, batch = next(self._it)
        self.sampler.position = self._at = position
        return idx, batch

    def close(self) -> None:
        """Stop the worker processes (a later `next` starts them again)."""
        it, self._it = self._it, None
        self.loader._iterator = None  # persistent workers: the loader keeps its iterator
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
