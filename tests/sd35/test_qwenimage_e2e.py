"""Qwen-Image end to end through `soar-fast` commands, on a tiny QwenImagePipeline built locally:

cache (Qwen2.5-VL embeddings of the templated caption, template tokens dropped, zero-padded with
lengths recorded; 5-D VAE latents [B, C, 1, H, W] normalised per channel, frame dropped) -> train
SOAR 2 steps (full and LoRA) -> QwenImagePipeline loads the export (final/ pipeline folder,
final/transformer, load_lora_weights) -> `sample --pipeline` (true CFG) writes images. A cache
of another family is refused in one line.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json

import torch
from family_pipelines import (
    cache_with_cli,
    check_full_and_lora_train_export_sample,
    check_text_masks,
    probe_velocity,
    sample_flags,
    train_on_cache_errors,
)

from soar_fast.cli import main
from soar_fast.data.shards import ShardDataset, load_empty_prompt
from soar_fast.models.qwenimage import QwenImageVelocityFn, latents_to_vae

L = 160  # max_sequence_length: a byte-level tokenizer makes the template's kept part ~125 tokens
SAMPLE = sample_flags(L, guidance_scale=2.0)


@pytest.fixture(scope="module")
def qwen_cache(qwen_dir, caption_folder, tmp_path_factory):
    return cache_with_cli(qwen_dir, caption_folder, tmp_path_factory.mktemp("qwen_cache") / "cache", L)


def _probe(transformer):
    return probe_velocity(QwenImageVelocityFn, transformer, (1, 16, 8, 8), (1, 7, 16))


def test_cache_is_what_qwenimage_pipeline_feeds(qwen_cache, qwen_dir):
    from diffusers import QwenImagePipeline

    from soar_fast.data.images import image_to_tensor, load_image

    index = json.loads((qwen_cache / "index.json").read_text())
    assert index["info"]["family"] == "qwenimage" and index["num_samples"] == 6
    ds = ShardDataset(qwen_cache)
    lat, pe, pooled = ds[0]
    # zero-padded to the longest prompt of the cache (counted by the tokenizer), not to L
    longest = max(ds.prompt_length(i) for i in range(len(ds)))
    assert index["info"]["text_length"] == longest < L and len({ds.prompt_length(i) for i in range(len(ds))}) > 1
    assert lat.shape == (16, 8, 8) and pe.shape == (longest, 16) and pooled.shape == (0,)
    pipe = QwenImagePipeline.from_pretrained(qwen_dir, local_files_only=True)
    with torch.no_grad():
        ref_pe, ref_mask = pipe.encode_prompt([ds.caption(0), ""], max_sequence_length=L)
        px = image_to_tensor(load_image(ds.source(0)))[None, :, None]  # one frame [1, 3, 1, H, W]
        dist = pipe.vae.encode(px).latent_dist.mode()
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
        ref = ((dist - mean) / std)[:, :, 0]
        decoded = latents_to_vae(pipe.vae, lat[None])
    n = ds.prompt_length(0)
    assert n == int(ref_mask[0].sum()) < longest  # a padded batch: the pipeline masks the shorter prompt
    torch.testing.assert_close(pe[:n], ref_pe[0, :n])
    assert not pe[n:].any()
    torch.testing.assert_close(lat, ref[0])
    torch.testing.assert_close(decoded, dist, atol=1e-5, rtol=1e-5)  # latents_to_vae inverts the normalisation
    u_pe, u_pooled = load_empty_prompt(qwen_cache)
    k = index["info"]["empty_prompt_length"]
    assert k == int(ref_mask[1].sum()) and u_pooled.shape == (0,)
    torch.testing.assert_close(u_pe[:k], ref_pe[1, :k])
    assert index["info"]["vae_latents_std"] == list(pipe.vae.config.latents_std)


def test_the_trainer_gets_each_prompts_mask(qwen_cache):
    check_text_masks(qwen_cache)


def test_full_and_lora_train_export_sample(qwen_dir, qwen_cache, tmp_path):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    check_full_and_lora_train_export_sample("tiny-qwenimage", qwen_dir, qwen_cache, tmp_path, QwenImagePipeline,
                                            QwenImageTransformer2DModel, _probe, SAMPLE)


def test_a_cache_of_another_family_is_one_line(qwen_dir, tiny_zimage_cache, tmp_path, capsys):
    """A Z-Image cache (16 channels as Qwen-Image's here, Qwen3 width 32 vs Qwen2.5-VL 16) under the
    Qwen-Image folder: one line, naming the fix."""
    rc, err = train_on_cache_errors("tiny-qwenimage", qwen_dir, tiny_zimage_cache, tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and "text embeddings are 32 wide" in err[0]
    assert "cache the data with this model's pipeline" in err[0]


def test_cache_into_another_familys_cache_is_one_line(qwen_dir, tiny_zimage_cache, caption_folder, capsys):
    """`soar-fast cache` of the Qwen-Image folder into the Z-Image cache's folder: one line, naming both
    families and the fix; the Z-Image cache is left as it was."""
    before = {p.name: p.stat().st_mtime_ns for p in tiny_zimage_cache.iterdir()}
    rc = main(["cache", "--pretrained_model_name_or_path", str(qwen_dir), "--data.root", str(caption_folder),
               "--data.resolution", "32", "--output_dir", str(tiny_zimage_cache), "--num_workers", "0", "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2 and len(err) == 1, err
    assert "made by a zimage pipeline" in err[0] and "is a qwenimage pipeline" in err[0] and "--output_dir" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in tiny_zimage_cache.iterdir()} == before


def test_a_resumed_cache_pads_to_the_same_length(qwen_dir, qwen_cache, caption_folder, tmp_path):
    """Deleting one shard of the Qwen-Image cache and re-running the same command rewrites only it, padded to the same
    text_length (counted again from the captions), so the cache verifies and the shard is unchanged."""
    import shutil

    from safetensors.torch import load_file

    from soar_fast.data.cache import CacheConfig, run_cache
    from soar_fast.data.images import ImageFolderConfig

    out = tmp_path / "cache"
    shutil.copytree(qwen_cache, out)
    want = load_file(out / "shard-00001.safetensors")
    (out / "shard-00001.safetensors").unlink()
    res = run_cache(CacheConfig(pretrained_model_name_or_path=str(qwen_dir), output_dir=str(out),
                                data=ImageFolderConfig(root=str(caption_folder), resolution=32), max_sequence_length=L,
                                batch_size=4, shard_size=4, num_workers=0, progress=False, store_dtype="float32"))
    assert (res.shards_written, res.shards_reused, res.num_samples) == (1, 1, 6)
    got = load_file(out / "shard-00001.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    assert got["prompt_embeds"].shape[1] == json.loads((out / "index.json").read_text())["info"]["text_length"] < L
