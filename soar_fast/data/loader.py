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
"""

from __future__ import annotations

import torch

from soar_fast.config import ConfigError

__all__ = ["ResumableSampler"]


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
