"""Training refuses a cache shard whose bytes changed on disk (sha256 against index.json), in one
line naming the shard and the fix; `--data.no-verify_shards` skips the check for trusted storage;
`soar-fast cache --resume` (the fix the line names) rewrites exactly the damaged shard."""

import json
import shutil

import pytest
import torch

from soar_fast.cli import main
from soar_fast.config import ConfigError
from soar_fast.data.latents import LatentsDataset
from soar_fast.data.shards import ShardWriter

# The tiny recipe's model is the 'digits' preset: 1 latent channel, joint_attention_dim 64, pooled 64.
TRAIN = ["train", "--recipe", "tiny", "--data.source", "latents", "--max_train_steps", "2", "--report_to", "none",
         "--checkpointing_steps", "0", "--checkpoint.no-save_final_model", "--logging.no-progress_bar", "--runtime.device", "cpu"]


def _digits_cache(d, shards=2, n=8):
    w = ShardWriter(d, fingerprint="test")
    g = torch.Generator().manual_seed(0)
    w.write_empty_prompt(torch.randn(1, 1, 64, generator=g), torch.randn(1, 64, generator=g))
    for i in range(shards):
        t = {"latents": torch.randn(n, 1, 8, 8, generator=g), "prompt_embeds": torch.randn(n, 1, 64, generator=g),
             "pooled": torch.randn(n, 64, generator=g)}
        w.write_shard(i, t, [f"cap {i}.{r}" for r in range(n)], [f"src{i}.{r}.png" for r in range(n)])
    w.finish(shards)
    return d


def _flip_last_byte(path):
    """One flipped bit in the tensor data (the file's last byte): same size, header intact."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_in_one_line_and_the_skip_flag_trains(tmp_path, capsys):
    cache = _digits_cache(tmp_path / "cache")
    shard = cache / "shard-00001.safetensors"
    size = shard.stat().st_size
    _flip_last_byte(shard)
    assert shard.stat().st_size == size
    run = tmp_path / "run"
    rc = main([*TRAIN, "--data.data_dir", str(cache), "--output_dir", str(run)])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2 and len(err) == 1, err
    assert "shard-00001.safetensors" in err[0] and "sha256" in err[0] and "soar-fast cache --resume" in err[0]
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()

    assert main([*TRAIN, "--data.data_dir", str(cache), "--output_dir", str(run), "--data.no-verify_shards"]) == 0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_a_good_cache_verifies_and_every_damage_is_one_config_error(tmp_path):
    cache = _digits_cache(tmp_path / "cache")
    assert len(LatentsDataset(str(cache))) == 16
    _flip_last_byte(cache / "empty_prompt.safetensors")
    with pytest.raises(ConfigError, match=r"empty_prompt\.safetensors fails its sha256"):
        LatentsDataset(str(cache))
    _flip_last_byte(cache / "shard-00000.safetensors")
    with pytest.raises(ConfigError, match=r"\(1 more file\(s\) fail too\); re-run `soar-fast cache --resume`"):
        LatentsDataset(str(cache))
    assert len(LatentsDataset(str(cache), verify_hashes=False)) == 16
    (cache / "shard-00001.safetensors").write_bytes(b"x" * 10)  # the shape check still runs without hashing
    with pytest.raises(ConfigError, match=r"shard-00001\.safetensors is unreadable") as e:
        LatentsDataset(str(cache), verify_hashes=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not a soar_fast cache"):
        LatentsDataset(str(tmp_path / "nowhere"))


def test_cache_resume_rewrites_the_damaged_shard(tiny_cache, tmp_path):
    """The fix the error names: re-running `soar-fast cache` on the folder rewrites only the bad shard."""
    pytest.importorskip("transformers")
    from dataclasses import replace

    from soar_fast.data.cache import run_cache

    cfg, _ = tiny_cache
    copy = tmp_path / "cache"
    shutil.copytree(cfg.output_dir, copy)
    _flip_last_byte(copy / "shard-00000.safetensors")
    with pytest.raises(ConfigError, match="shard-00000"):
        LatentsDataset(str(copy))
    res = run_cache(replace(cfg, output_dir=str(copy), resume=True))
    assert res.shards_written == 1 and res.shards_reused == res.num_shards - 1
    assert len(LatentsDataset(str(copy))) == res.num_samples
