"""Z-Image end to end through `soar-fast` commands, on a tiny ZImagePipeline built locally:

cache (Qwen3 hidden_states[-2] of the chat-templated caption, zero-padded, lengths recorded;
(latents - shift) * scale) -> train SOAR 2 steps (full and LoRA) -> ZImagePipeline loads the
export (the final/ pipeline folder, final/transformer, load_lora_weights) -> `sample --pipeline`
writes images. A cache of another family is refused in one line.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json

import torch
from family_pipelines import (
    check_full_and_lora_train_export_sample,
    check_text_masks,
    probe_velocity,
    sample_flags,
    train_on_cache_errors,
)

from soar_fast.data.shards import ShardDataset, load_empty_prompt
from soar_fast.models.zimage import ZImageVelocityFn

L = 32  # max_sequence_length: the longest caption is 32 chat-templated tokens
SAMPLE = sample_flags(L, guidance_scale=1.0)


@pytest.fixture(scope="module")
def zimage_dir(tiny_zimage_dir):
    return tiny_zimage_dir


@pytest.fixture(scope="module")
def zimage_cache(tiny_zimage_cache):  # `soar-fast cache ... --max_sequence_length 32` (conftest.py)
    return tiny_zimage_cache


def _probe(transformer):
    return probe_velocity(ZImageVelocityFn, transformer, (1, 16, 8, 8), (1, 7, 32))


def test_cache_is_what_zimage_pipeline_feeds(zimage_cache, zimage_dir, caption_folder):
    from diffusers import ZImagePipeline

    from soar_fast.data.images import image_to_tensor, load_image

    index = json.loads((zimage_cache / "index.json").read_text())
    assert index["info"]["family"] == "zimage" and index["num_samples"] == 6
    ds = ShardDataset(zimage_cache)
    lat, pe, pooled = ds[0]
    assert index["info"]["text_length"] == L  # the longest caption is L = 32 tokens (truncated to L if longer)
    assert lat.shape == (16, 8, 8) and pe.shape == (L, 32) and pooled.shape == (0,)
    pipe = ZImagePipeline.from_pretrained(zimage_dir, local_files_only=True)
    with torch.no_grad():
        rows = pipe._encode_prompt([ds.caption(0), ""], max_sequence_length=L)
        px = image_to_tensor(load_image(ds.source(0)))[None]
        ref = (pipe.vae.encode(px).latent_dist.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    n = ds.prompt_length(0)
    assert n == rows[0].shape[0] < L
    torch.testing.assert_close(pe[:n], rows[0])  # the valid tokens, then zero padding
    assert not pe[n:].any()
    torch.testing.assert_close(lat, ref[0])
    u_pe, u_pooled = load_empty_prompt(zimage_cache)
    k = index["info"]["empty_prompt_length"]
    assert k == rows[1].shape[0] and u_pooled.shape == (0,)
    torch.testing.assert_close(u_pe[:k], rows[1])


def test_the_trainer_gets_each_prompts_mask(zimage_cache):
    check_text_masks(zimage_cache)


def test_full_and_lora_train_export_sample(zimage_dir, zimage_cache, tmp_path):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    check_full_and_lora_train_export_sample("tiny-zimage", zimage_dir, zimage_cache, tmp_path, ZImagePipeline,
                                            ZImageTransformer2DModel, _probe, SAMPLE)


def test_a_cache_of_another_family_is_one_line(zimage_dir, tiny_cache, tmp_path, capsys):
    """The SD3 cache (4 latent channels, T5 width 32 + pooled 64) under the Z-Image folder: one line."""
    sd3_cache = tiny_cache[0].output_dir
    rc, err = train_on_cache_errors("tiny-zimage", zimage_dir, sd3_cache, tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and "channels" in err[0] and "data.source" in err[0]
