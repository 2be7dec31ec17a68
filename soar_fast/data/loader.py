"""A resumable batch stream: the data position is one integer, so a checkpoint restores it exactly.

The stream is the concatenation of per-epoch permutations; epoch e's permutation comes from a
generator seeded with (seed, e), so no RNG state has to be saved, only `position` (samples drawn).

Data parallel: with `world_size` W each call consumes one global batch of W·batch_size rows of
the stream and rank r gets rows [r·batch_size, (r+1)·batch_size) of it: disjoint shards, and the
union over ranks is exactly the batch a single process with batch_size·W would draw. `position`
counts global samples, so a checkpoint resumes at any world size.
"""

from __future__ import annotations

import torch

__all__ = ["ResumableSampler"]


class ResumableSampler:
    """Yields index batches `[batch_size]` of a dataset of `n` rows, epoch after epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, position: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("the dataset is empty: add data or pick another data.source")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.batch_size, self.seed, self.position = n, batch_size, seed, position
        self.rank, self.world_size = rank, world_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

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
            epoch, offset = divmod(self.position, self.n)
            take = min(need, self.n - offset)
            out.append(self._permutation(epoch)[offset:offset + take])
            self.position += take
            need -= take
        return torch.cat(out)

    @property
    def epoch(self) -> float:
        return self.position / self.n

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n:
            raise ValueError(f"checkpoint was written for a dataset of {state.get('n')} rows, this one has {self.n}")
        self.position = int(state["position"])
