"""The trainer's batch stream (a DataLoader over the resumable sampler): exactly the sampler's
batches with or without workers, buckets kept, resume at the consumed position, rank split."""

import itertools

import pytest
import torch

from soar_fast.config import ConfigError, DataConfig
from soar_fast.data import BatchStream, ResumableSampler, default_num_workers
from soar_fast.data.latents import LatentsDataset
from soar_fast.data.shards import ShardWriter

GROUPS = [0] * 7 + [1] * 10 + [2] * 5  # 22 rows in three buckets


class _Rows:
    """A dataset whose rows carry their own index (and bucket), so a batch says where it came from."""

    def __init__(self, groups=GROUPS):
        self.groups = groups

    def __len__(self):
        return len(self.groups)

    def batch(self, idx):
        return idx.clone(), (torch.tensor([self.groups[i] for i in idx.tolist()]),), None


def _reference(k, **kw):
    s = ResumableSampler(len(GROUPS), 2, seed=3, groups=GROUPS, **kw)
    return [s.next_indices() for _ in range(k)]


@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "workers2"])
def test_stream_yields_the_sampler_batches_from_one_bucket(workers):
    ref = _reference(14)  # 14 batches of 2: past the epoch of 20 rows
    sampler = ResumableSampler(len(GROUPS), 2, seed=3, groups=GROUPS)
    stream = BatchStream(_Rows(), sampler, num_workers=workers, prefetch_factor=2)
    for k, (idx, (rows, (bucket,), _)) in enumerate(itertools.islice(stream, 14)):
        assert torch.equal(idx, ref[k]) and torch.equal(rows, ref[k]) and len(set(bucket.tolist())) == 1
        assert sampler.position == 2 * (k + 1)  # what was consumed, not what the workers prefetched
    stream.close()


def test_resume_mid_epoch_with_workers_continues_the_same_batches():
    ref = _reference(12)
    a = ResumableSampler(len(GROUPS), 2, seed=3, groups=GROUPS)
    first = BatchStream(_Rows(), a, num_workers=2, prefetch_factor=4)
    list(itertools.islice(first, 5))  # the workers have prefetched well past batch 5
    state = a.state_dict()
    assert state["position"] == 10
    first.close()
    b = ResumableSampler(len(GROUPS), 2, seed=3, groups=GROUPS)
    b.load_state_dict(state)
    again = [idx for idx, _ in itertools.islice(BatchStream(_Rows(), b, num_workers=2), 7)]
    assert all(torch.equal(x, y) for x, y in zip(ref[5:], again, strict=True))
    # the same stream, moved back by a resume: it restarts its workers at the restored position
    a.load_state_dict({**state, "position": 4})
    assert torch.equal(next(first)[0], ref[2])
    first.close()


def test_world_size_2_ranks_split_each_global_batch():
    single = ResumableSampler(len(GROUPS), 4, seed=3, groups=GROUPS)
    whole = [single.next_indices() for _ in range(6)]
    ranks = [BatchStream(_Rows(), ResumableSampler(len(GROUPS), 2, seed=3, rank=r, world_size=2, groups=GROUPS),
                         num_workers=w) for r, w in ((0, 0), (1, 2))]
    for k, (b0, b1) in enumerate(zip(*(itertools.islice(s, 6) for s in ranks))):
        assert torch.equal(torch.cat([b0[0], b1[0]]), whole[k])
    assert all(s.sampler.position == 6 * 4 for s in ranks)  # global samples
    ranks[1].close()


def _cache(d, n=6):
    w = ShardWriter(d, fingerprint="t")
    g = torch.Generator().manual_seed(0)
    w.write_empty_prompt(torch.randn(1, 5, 6, generator=g), torch.randn(1, 3, generator=g))
    for i, s in enumerate(((4, 8, 8), (4, 8, 12))):
        w.write_shard(i, {"latents": torch.randn(n, *s, generator=g).bfloat16(),
                          "prompt_embeds": torch.randn(n, 5, 6, generator=g).bfloat16(),
                          "pooled": torch.randn(n, 3, generator=g).bfloat16()},
                      [f"c{i}.{r}" for r in range(n)], [f"s{i}.{r}" for r in range(n)])
    w.finish(2)


def test_latent_cache_through_forked_workers_matches_in_process(tmp_path):
    _cache(tmp_path)
    ds = LatentsDataset(str(tmp_path))
    assert ds.sample_shape == (4, 8, 8)  # opened shard 0 in this process: the workers must not share it
    runs = []
    for workers in (0, 2):
        s = ResumableSampler(len(ds), 2, seed=1, groups=ds.groups)
        stream = BatchStream(ds, s, num_workers=workers)
        runs.append(list(itertools.islice(stream, 8)))
        stream.close()
    for (i0, (z0, (pe0, p0), _)), (i1, (z1, (pe1, p1), _)) in zip(*runs, strict=True):
        assert torch.equal(i0, i1) and torch.equal(z0, z1) and torch.equal(pe0, pe1) and torch.equal(p0, p1)
        assert z0.dtype == torch.float32 and z0.shape[0] == 2


def test_config_and_default_workers():
    assert default_num_workers("digits") == default_num_workers("synthetic") == 0
    assert 1 <= default_num_workers("latents") <= 4
    with pytest.raises(ConfigError, match=r"^data\.num_workers=-1 is invalid"):
        DataConfig(num_workers=-1)
    with pytest.raises(ConfigError, match=r"^data\.prefetch_factor=0 is invalid"):
        DataConfig(prefetch_factor=0)
