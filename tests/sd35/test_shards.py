"""Shard writer/reader: round trip, the trainer's batch stream over a cache, and damaged shards named in the error."""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from soar_fast.config import ConfigError
from soar_fast.data.latents import LatentsDataset
from soar_fast.data.loader import BatchStream, ResumableSampler
from soar_fast.data.shards import (
    ShardDataset,
    ShardError,
    ShardWriter,
    load_empty_prompt,
    verify_cache,
)


def _stream(d, batch_size, workers=0, seed=0, verify_hashes=False):
    ds = LatentsDataset(str(d), verify_hashes=verify_hashes)
    return ds, BatchStream(ds, ResumableSampler(len(ds), batch_size, seed, groups=ds.groups), num_workers=workers)


def _write_cache(d, shapes=((4, 8, 8), (4, 8, 8), (4, 8, 12)), n=3):
    w = ShardWriter(d, fingerprint="test")
    g = torch.Generator().manual_seed(0)
    w.write_empty_prompt(torch.randn(1, 10, 6, generator=g), torch.randn(1, 5, generator=g))
    for i, s in enumerate(shapes):
        t = {"latents": torch.randn(n, *s, generator=g), "prompt_embeds": torch.randn(n, 10, 6, generator=g),
             "pooled": torch.randn(n, 5, generator=g)}
        w.write_shard(i, t, [f"cap {i}.{r}" for r in range(n)], [f"src{i}.{r}.png" for r in range(n)])
    w.finish(len(shapes))
    return w


def test_round_trip_and_loader(tmp_path):
    _write_cache(tmp_path)
    idx = verify_cache(tmp_path)
    assert idx["num_samples"] == 9 and idx["complete"]
    e = idx["shards"][2]
    assert e["tensors"]["latents"] == {"shape": [3, 4, 8, 12], "dtype": "float32"} and len(e["sha256"]) == 64
    ds = ShardDataset(tmp_path, verify="hash")
    lat, pe, pooled = ds[7]
    assert lat.shape == (4, 8, 12) and pe.shape == (10, 6) and pooled.shape == (5,) and ds.caption(7) == "cap 2.1"
    assert ds.source(2) == "src0.2.png"
    u_pe, u_pooled = load_empty_prompt(tmp_path)
    assert u_pe.shape == (10, 6) and u_pooled.shape == (5,)

    _, stream = _stream(tmp_path, 2, workers=2)
    seen = []
    for idx, (lat, (pe, pooled), _) in itertools.islice(stream, 4):  # an epoch: buckets of 6 and 3 -> 3 + 1 batches
        assert lat.shape[1:] in ((4, 8, 8), (4, 8, 12)) and pe.shape[1:] == (10, 6) and pooled.shape[1:] == (5,)
        torch.testing.assert_close(lat[1], ds[int(idx[1])][0])
        seen += idx.tolist()
    stream.close()
    assert len(set(seen)) == 8 and stream.sampler.epoch == 1.0


def test_stream_reshuffles_each_epoch(tmp_path):
    _write_cache(tmp_path, shapes=((4, 8, 8),) * 4, n=4)
    _, stream = _stream(tmp_path, 16)
    (_, a), (_, b) = itertools.islice(stream, 2)
    key = lambda x: sorted(x[1][1][:, 0].tolist())  # noqa: E731 - same samples, other order
    assert key(a) == key(b) and not torch.equal(a[1][1], b[1][1])


def test_stream_content_matches_files(tmp_path):
    _write_cache(tmp_path)
    from safetensors.torch import load_file

    ref = load_file(tmp_path / "shard-00002.safetensors")
    _, stream = _stream(tmp_path, 3)
    for idx, (lat, (_, pooled), _) in itertools.islice(stream, 6):
        if lat.shape[-1] == 12:
            rows = (idx - 6).tolist()  # the last shard's rows, in the stream's order
            torch.testing.assert_close(lat, ref["latents"][rows])
            torch.testing.assert_close(pooled, ref["pooled"][rows])
            return
    raise AssertionError("no batch of the 12-wide bucket")


def test_wrong_checksum_names_the_shard(tmp_path):
    _write_cache(tmp_path)
    # same shapes, different values: only the checksum can tell
    save_file({"latents": torch.zeros(3, 4, 8, 8), "prompt_embeds": torch.zeros(3, 10, 6), "pooled": torch.zeros(3, 5)},
              tmp_path / "shard-00001.safetensors")
    verify_cache(tmp_path, check_hash=False)
    with pytest.raises(ShardError, match=r"shard-00001\.safetensors fails its sha256.*re-run `soar-fast cache`"):
        verify_cache(tmp_path)
    with pytest.raises(ConfigError, match="shard-00001"):
        _stream(tmp_path, 2, verify_hashes=True)


def test_wrong_shape_names_the_shard(tmp_path):
    _write_cache(tmp_path)
    save_file({"latents": torch.zeros(3, 4, 8, 9), "prompt_embeds": torch.zeros(3, 10, 6), "pooled": torch.zeros(3, 5)},
              tmp_path / "shard-00000.safetensors")
    with pytest.raises(ShardError, match=r"shard-00000\.safetensors holds .*8, 9.* but index\.json says"):
        ShardDataset(tmp_path, verify="shape")


def test_missing_truncated_and_incomplete(tmp_path):
    _write_cache(tmp_path)
    data = (tmp_path / "shard-00002.safetensors").read_bytes()
    (tmp_path / "shard-00002.safetensors").write_bytes(data[:50])
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors is unreadable"):
        verify_cache(tmp_path, check_hash=False)
    (tmp_path / "shard-00002.safetensors").unlink()
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors listed in index.json is missing"):
        verify_cache(tmp_path)
    idx = json.loads((tmp_path / "index.json").read_text())
    idx["complete"] = False
    (tmp_path / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="incomplete"):
        verify_cache(tmp_path)
    with pytest.raises(ShardError, match="not a soar_fast cache"):
        verify_cache(tmp_path / "nowhere")


def test_writer_refuses_other_fingerprint_and_bad_batches(tmp_path):
    _write_cache(tmp_path)
    with pytest.raises(ShardError, match="other settings"):
        ShardWriter(tmp_path, fingerprint="other")
    w = ShardWriter(tmp_path, fingerprint="test")
    with pytest.raises(ValueError, match="one batch size"):
        w.write_shard(5, {"latents": torch.zeros(2, 1), "prompt_embeds": torch.zeros(3, 1), "pooled": torch.zeros(2, 1)},
                      ["a", "b"], ["a", "b"])
    with pytest.raises(ConfigError, match="no aspect bucket holds a full global batch"):
        _stream(tmp_path, 7)
