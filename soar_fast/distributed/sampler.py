"""A resumable distributed sampler: disjoint per rank, deterministic per (seed, epoch).

Built on `torch.utils.data.DistributedSampler`: the same permutation (randperm seeded with
seed + epoch), the same padding / drop_last rules and the same rank striding, so from the start of
an epoch it yields exactly what DistributedSampler yields. What it adds is a global position:
`state_dict()` records how many samples of the epoch's order all ranks together have consumed,
and `load_state_dict()` continues from there, at the same or a different world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler with mid-epoch resume.

    The position advances by `num_replicas` for every index this rank yields (every rank takes one
    index of each group of `num_replicas` consecutive entries of the epoch order), so
    `state_dict()` is exact when the sampler is iterated in the training process (a DataLoader with
    `num_workers=0`, or direct use). With worker processes, call `set_position(consumed)` from the
    trainer's own count of consumed global samples before saving.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0  # global entries of the epoch order consumed before this iteration
        self.yielded = 0  # indices this rank has yielded in the current iteration

    def _order(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=g).tolist()
        return list(range(n))

    def _remaining(self) -> list[int]:
        rest = self._order()[self.start :]
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % self.num_replicas]
        else:
            pad = (-len(rest)) % self.num_replicas
            if pad:
                rest = rest + (rest * math.ceil(pad / max(len(rest), 1)))[:pad]
        return rest

    def __iter__(self) -> Iterator[int]:
        mine = self._remaining()[self.rank :: self.num_replicas]
        self.yielded = 0
        for idx in mine:
            self.yielded += 1
            yield idx

    def __len__(self) -> int:
        return len(self._remaining()) // self.num_replicas

    @property
    def position(self) -> int:
        """Global samples of this epoch consumed so far (all ranks together)."""
        return self.start + self.yielded * self.num_replicas

    def set_position(self, consumed: int) -> None:
        """Continue the current epoch after `consumed` global samples (takes effect at next iter)."""
        self.start, self.yielded = int(consumed), 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning."""
        super().set_epoch(epoch)
        self.start, self.yielded = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": len(self.dataset)}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler has {self.seed}")
        if state.get("num_samples", len(self.dataset)) != len(self.dataset):  # type: ignore[arg-type]
            raise ValueError("sampler state was saved for a dataset of a different size")
        self.epoch = int(state["epoch"])
        self.set_position(int(state["position"]))
