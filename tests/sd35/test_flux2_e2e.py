"""FLUX.2 end to end through `soar-fast` commands, on a tiny Flux2Pipeline built locally:

cache (Mistral-3 hidden states of layers 10, 20, 30 stacked, padded to max_sequence_length as
the pipeline feeds them; VAE latents patchified 2x2 and batch-norm normalised) -> train SOAR 2
steps (full and LoRA) -> Flux2Pipeline loads the export (final/ pipeline folder,
final/transformer, load_lora_weights) -> `sample --pipeline` writes images. A cache of another
family is refused in one line.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json

import torch
from family_pipelines import (
    cache_with_cli,
    check_full_and_lora_train_export_sample,
    probe_velocity,
    sample_flags,
    train_on_cache_errors,
)

from soar_fast.data.shards import ShardDataset, load_empty_prompt
from soar_fast.models.flux2 import Flux2VelocityFn

L = 192  # max_sequence_length: the byte-level tokenizer makes the system message ~170 tokens
SAMPLE = sample_flags(L, guidance_scale=4.0)


@pytest.fixture(scope="module")
def flux2_cache(flux2_dir, caption_folder, tmp_path_factory):
    return cache_with_cli(flux2_dir, caption_folder, tmp_path_factory.mktemp("flux2_cache") / "cache", L)


def _probe(transformer):
    return probe_velocity(Flux2VelocityFn, transformer, (1, 16, 4, 4), (1, 7, 48))


def test_cache_is_what_flux2_pipeline_feeds(flux2_cache, flux2_dir):
    from diffusers import Flux2Pipeline

    from soar_fast.data.images import image_to_tensor, load_image
    from soar_fast.models.flux2 import latents_to_vae

    index = json.loads((flux2_cache / "index.json").read_text())
    assert index["info"]["family"] == "flux2" and index["num_samples"] == 6
    ds = ShardDataset(flux2_cache)
    lat, pe, pooled = ds[0]
    assert lat.shape == (16, 4, 4) and pe.shape == (L, 48) and pooled.shape == (0,)
    assert ds.prompt_length(0) is None  # the pipeline feeds all L tokens: nothing to record
    pipe = Flux2Pipeline.from_pretrained(flux2_dir, local_files_only=True)
    with torch.no_grad():
        ref_pe, _ = pipe.encode_prompt([ds.caption(0), ""], max_sequence_length=L)
        px = image_to_tensor(load_image(ds.source(0)))[None]
        ref = pipe._encode_vae_image(px, generator=None)  # the pipeline's own image -> latents path
        raw = pipe.vae.encode(px).latent_dist.mode()
    torch.testing.assert_close(pe, ref_pe[0])
    torch.testing.assert_close(lat, ref[0])
    torch.testing.assert_close(latents_to_vae(pipe.vae, lat[None]), raw, atol=1e-5, rtol=1e-5)
    u_pe, u_pooled = load_empty_prompt(flux2_cache)
    torch.testing.assert_close(u_pe, ref_pe[1])
    assert u_pooled.shape == (0,) and "empty_prompt_length" not in index["info"]


def test_full_and_lora_train_export_sample(flux2_dir, flux2_cache, tmp_path):
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    check_full_and_lora_train_export_sample("tiny-flux2", flux2_dir, flux2_cache, tmp_path, Flux2Pipeline,
                                            Flux2Transformer2DModel, _probe, SAMPLE)


def test_a_cache_of_another_family_is_one_line(flux2_dir, tiny_zimage_cache, tmp_path, capsys):
    """A Z-Image cache (16 channels as FLUX.2's here; Qwen3 width 32 vs Mistral's stacked 48) under
    the FLUX.2 folder: one line, naming the fix."""
    rc, err = train_on_cache_errors("tiny-flux2", flux2_dir, tiny_zimage_cache, tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and "text embeddings are 32 wide" in err[0]
    assert "cache the data with this model's pipeline" in err[0]
