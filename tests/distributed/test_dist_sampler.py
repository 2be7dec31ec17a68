"""The resumable distributed sampler: disjoint, covering, deterministic, resumable mid-epoch."""

import pytest
from torch.utils.data import DistributedSampler

from soar_fast.distributed import ResumableDistributedSampler

pytestmark = pytest.mark.distributed


def _epoch(n, world, seed=0, epoch=0, drop_last=False):
    out = []
    for r in range(world):
        s = ResumableDistributedSampler(range(n), num_replicas=world, rank=r, seed=seed, drop_last=drop_last)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,world", [(12, 2), (12, 3), (13, 4), (5, 1)], ids=lambda v: str(v))
def test_same_as_torch_distributed_sampler_from_epoch_start(n, world):
    for drop_last in (False, True):
        ours = _epoch(n, world, seed=3, epoch=2, drop_last=drop_last)
        for r in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=r, seed=3, drop_last=drop_last)
            ref.set_epoch(2)
            assert ours[r] == list(ref)
            assert len(ref) == len(ours[r])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_disjoint_and_covering(world):
    n = 24
    shards = _epoch(n, world, seed=1, epoch=0)
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == n  # disjoint, no padding needed (24 divisible)
    assert set(flat) == set(range(n))
    # with padding (n not divisible) every index still appears, only the pad repeats
    shards = _epoch(n + 1, 4, seed=1)
    assert set(i for s in shards for i in s) == set(range(n + 1))


def test_deterministic_per_seed_and_epoch():
    assert _epoch(20, 2, seed=5, epoch=1) == _epoch(20, 2, seed=5, epoch=1)
    assert _epoch(20, 2, seed=5, epoch=1) != _epoch(20, 2, seed=5, epoch=2)
    assert _epoch(20, 2, seed=5, epoch=1) != _epoch(20, 2, seed=6, epoch=1)


@pytest.mark.parametrize("world_before,world_after", [(2, 2), (2, 1), (2, 4), (4, 2)])
def test_resume_mid_epoch_any_world_size(world_before, world_after):
    n, per_rank_taken = 26, 3  # the unseen tail (20 or 14) splits evenly: no padding repeats
    full = _epoch(n, 1, seed=7, epoch=1)[0]  # the epoch's global order
    samplers = [ResumableDistributedSampler(range(n), num_replicas=world_before, rank=r, seed=7) for r in range(world_before)]
    seen = []
    for s in samplers:
        s.set_epoch(1)
        it = iter(s)
        seen += [next(it) for _ in range(per_rank_taken)]
    state = samplers[0].state_dict()
    assert state["position"] == per_rank_taken * world_before and state["epoch"] == 1
    assert all(s.state_dict() == state for s in samplers)  # global state: the same on every rank

    rest = []
    for r in range(world_after):
        s = ResumableDistributedSampler(range(n), num_replicas=world_after, rank=r, seed=7)
        s.load_state_dict(state)
        rest.append(list(s))
    got = [i for s in rest for i in s]
    assert sorted(seen + got) == list(range(n))  # nothing lost, nothing repeated
    assert sorted(got) == sorted(full[state["position"]:])  # exactly the unseen tail of the order
    assert rest[0][0] == full[state["position"]]


def test_resume_with_padding_still_covers():
    n = 11  # 11 - 4 = 7 left for 2 ranks: one pad entry, repeated from the tail
    s0 = ResumableDistributedSampler(range(n), num_replicas=2, rank=0, seed=0)
    s1 = ResumableDistributedSampler(range(n), num_replicas=2, rank=1, seed=0)
    it0, it1 = iter(s0), iter(s1)
    seen = [next(it0), next(it1), next(it0), next(it1)]
    state = s0.state_dict()
    rest = []
    for r in range(2):
        s = ResumableDistributedSampler(range(n), num_replicas=2, rank=r, seed=0)
        s.load_state_dict(state)
        assert len(s) == 4
        rest += list(s)
    assert set(seen + rest) == set(range(n)) and len(rest) == 8


def test_state_checks_and_new_epoch_resets_position():
    s = ResumableDistributedSampler(range(10), num_replicas=2, rank=0, seed=1)
    next(iter(s))
    assert s.position == 2
    s.set_epoch(1)
    assert s.position == 0
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 2, "num_samples": 10})
    with pytest.raises(ValueError, match="size"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 1, "num_samples": 11})
