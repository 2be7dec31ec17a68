"""`run_cache` on the tiny SD3 pipeline: contents, resume, bad inputs."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json
import shutil
from dataclasses import replace

import torch
from sd35_helpers import make_caption_folder, write_image

from soar_fast.config.sd35 import NotAPipelineError
from soar_fast.data.cache import CacheConfig, run_cache
from soar_fast.data.images import CaptionError, ImageFolderConfig
from soar_fast.data.shards import ShardDataset, load_empty_prompt, read_index, verify_cache


def test_cache_matches_pipeline_encoders(tiny_cache, tiny_sd3_dir, caption_folder):
    from diffusers import StableDiffusion3Pipeline

    cfg, res = tiny_cache
    assert (res.num_samples, res.num_shards, res.shards_written, res.skipped) == (6, 2, 2, [])
    ds = ShardDataset(cfg.output_dir, verify="hash")
    assert len(ds) == 6
    lat, pe, pooled = ds[0]
    assert lat.shape == (4, 16, 16) and pe.shape == (77 + 16, 32) and pooled.shape == (64,)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, local_files_only=True)
    from soar_fast.data.images import image_to_tensor, load_image

    src = ds.source(0)
    with torch.no_grad():
        x = image_to_tensor(load_image(src))[None]
        ref = pipe.vae.encode(x).latent_dist.mode()
        ref = (ref - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        ref_pe, _, ref_pooled, _ = pipe.encode_prompt(ds.caption(0), None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=16)
        e_pe, _, e_pooled, _ = pipe.encode_prompt("", None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=16)
    torch.testing.assert_close(lat, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pe, ref_pe[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled[0], atol=1e-5, rtol=1e-5)
    u_pe, u_pooled = load_empty_prompt(cfg.output_dir)
    torch.testing.assert_close(u_pe, e_pe[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u_pooled, e_pooled[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(u_pe, pe)


def test_resume_reuses_verified_shards_and_rewrites_damaged(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    out = tmp_path / "cache"
    shutil.copytree(cfg.output_dir, out)
    cfg2 = replace(cfg, output_dir=str(out))
    again = run_cache(cfg2)
    assert (again.shards_written, again.shards_reused) == (0, 2)
    from safetensors.torch import load_file

    before = {k: v.clone() for k, v in load_file(out / "shard-00001.safetensors").items()}  # not mmap-backed
    (out / "shard-00001.safetensors").write_bytes(b"garbage")
    idx = json.loads((out / "index.json").read_text())
    idx["complete"] = False  # as if interrupted
    (out / "index.json").write_text(json.dumps(idx))
    res = run_cache(cfg2)
    assert (res.shards_written, res.shards_reused) == (1, 1)
    after = load_file(out / "shard-00001.safetensors")
    for k in before:  # deterministic re-encode (file bytes may differ: metadata order is not fixed)
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)
    verify_cache(out)


def test_other_settings_refuse_to_mix(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    out = tmp_path / "cache"
    shutil.copytree(cfg.output_dir, out)
    from soar_fast.data.shards import ShardError

    with pytest.raises(ShardError, match="other settings"):
        run_cache(replace(cfg, output_dir=str(out), max_sequence_length=8))


def test_corrupt_image_skipped_and_reported(tiny_sd3_dir, tmp_path):
    root = make_caption_folder(tmp_path / "imgs", n=3)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "broken.txt").write_text("a broken image")
    write_image(root / "trunc.png", seed=9)
    data = (root / "trunc.png").read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    (root / "trunc.txt").write_text("a truncated image")
    cfg = CacheConfig(pretrained_model_name_or_path=str(tiny_sd3_dir),
                      data=ImageFolderConfig(root=str(root), resolution=32), output_dir=str(tmp_path / "c"),
                      max_sequence_length=8, progress=False)
    res = run_cache(cfg)
    assert res.num_samples == 3
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in res.skipped) == ["broken.png", "trunc.png"]
    assert all(s["reason"] for s in res.skipped)
    assert len(read_index(cfg.output_dir)["skipped"]) == 2


def test_missing_caption_is_a_clear_error(tiny_sd3_dir, tmp_path):
    root = make_caption_folder(tmp_path / "imgs", n=2)
    (root / "img01.txt").unlink()
    cfg = CacheConfig(pretrained_model_name_or_path=str(tiny_sd3_dir),
                      data=ImageFolderConfig(root=str(root), resolution=32), output_dir=str(tmp_path / "c"),
                      progress=False)
    with pytest.raises(CaptionError, match=r"img01\.png.*allow_empty_captions"):
        run_cache(cfg)


def test_not_an_sd3_folder(tiny_sd3_dir, caption_folder, tmp_path):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    data = ImageFolderConfig(root=str(caption_folder), resolution=32)
    with pytest.raises(NotAPipelineError, match=r"holds a StableDiffusionXLPipeline.*not a StableDiffusion3Pipeline.*FluxPipeline"):
        run_cache(CacheConfig(pretrained_model_name_or_path=str(flux), data=data, output_dir=str(tmp_path / "c")))
    with pytest.raises(NotAPipelineError, match="single model folder"):
        run_cache(CacheConfig(pretrained_model_name_or_path=str(tiny_sd3_dir / "transformer"), data=data,
                              output_dir=str(tmp_path / "c")))
