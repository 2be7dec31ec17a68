"""Two gloo ranks verify a latent cache together: each hashes every 2nd file, and a shard damaged in
rank 1's share is refused by both ranks with the same one line (no rank trains, none hangs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2


def _worker(rank: int, init_file: str, cache: str, out: str) -> None:
    from soar_fast.config import ConfigError
    from soar_fast.data.latents import LatentsDataset

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        try:
            LatentsDataset(cache)
            verdict = "ok"
        except ConfigError as e:
            verdict = str(e)
        Path(out, f"rank{rank}.json").write_text(json.dumps(verdict))
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_hashing_and_agree(tmp_path: Path):
    from soar_fast.data.shards import ShardWriter

    cache = tmp_path / "cache"
    w = ShardWriter(cache, fingerprint="test")
    w.write_empty_prompt(torch.zeros(1, 1, 8), torch.zeros(1, 8))
    for i in range(3):
        w.write_shard(i, {"latents": torch.full((2, 1, 4, 4), float(i)), "prompt_embeds": torch.zeros(2, 1, 8),
                          "pooled": torch.zeros(2, 8)}, ["a", "b"], ["a.png", "b.png"])
    w.finish(3)
    # files in index order: empty_prompt, shard 0, shard 1, shard 2 -> rank 1 hashes shards 0 and 2
    shard = cache / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"), str(cache), str(tmp_path)), nprocs=WORLD, join=True)
    verdicts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert verdicts[0] == verdicts[1] and "shard-00002.safetensors fails its sha256" in verdicts[0]
