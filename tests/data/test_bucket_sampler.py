"""Aspect buckets in the resumable sampler: every batch from one bucket, deterministic, resumable."""

import pytest
import torch

from soar_fast.config import ConfigError
from soar_fast.data.loader import ResumableSampler

GROUPS = [0] * 7 + [1] * 10 + [2] * 5  # 22 rows in three buckets


def _batches(sampler, k):
    return [sampler.next_indices() for _ in range(k)]


def test_each_batch_comes_from_one_bucket_and_epochs_differ():
    s = ResumableSampler(len(GROUPS), 3, seed=1, groups=GROUPS)
    assert s.epoch_len == 2 * 3 + 3 * 3 + 1 * 3  # full batches per bucket: 2 + 3 + 1
    groups = torch.tensor(GROUPS)
    first = _batches(s, 6)
    for b in first + _batches(s, 12):
        assert len(set(groups[b].tolist())) == 1
    seen = torch.cat(first)
    assert len(set(seen.tolist())) == 18  # an epoch never repeats a row
    again = _batches(ResumableSampler(len(GROUPS), 3, seed=1, groups=GROUPS), 6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, _batches(s, 6)))  # next epoch: new order


def test_resume_mid_epoch_is_exact_and_ranks_share_a_bucket():
    ref = _batches(ResumableSampler(len(GROUPS), 2, seed=3, groups=GROUPS), 10)
    a = ResumableSampler(len(GROUPS), 2, seed=3, groups=GROUPS)
    _batches(a, 4)
    b = ResumableSampler(len(GROUPS), 2, seed=3, groups=GROUPS)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(ref[4:], _batches(b, 6)))
    groups = torch.tensor(GROUPS)
    r0 = ResumableSampler(len(GROUPS), 2, seed=3, rank=0, world_size=2, groups=GROUPS)
    r1 = ResumableSampler(len(GROUPS), 2, seed=3, rank=1, world_size=2, groups=GROUPS)
    for x, y in zip(_batches(r0, 5), _batches(r1, 5)):
        assert len(set(groups[torch.cat([x, y])].tolist())) == 1 and not set(x.tolist()) & set(y.tolist())


def test_one_bucket_or_no_groups_is_the_plain_stream():
    plain = _batches(ResumableSampler(9, 2, seed=0), 5)
    same = _batches(ResumableSampler(9, 2, seed=0, groups=[4] * 9), 5)
    assert all(torch.equal(a, b) for a, b in zip(plain, same))


def test_no_bucket_with_a_full_batch_is_a_clear_error():
    with pytest.raises(ConfigError, match="train_batch_size"):
        ResumableSampler(4, 3, seed=0, groups=[0, 0, 1, 1])
