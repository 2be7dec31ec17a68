"""FLUX.2 end to end through `soar-fast` commands, on tiny pipelines built locally, for both its
pipelines: Flux2Pipeline (dev: Mistral-3 hidden states of layers 10, 20, 30 stacked; guidance
embedding) and Flux2KleinPipeline (klein: Qwen3 hidden states 9, 18, 27 stacked; no guidance
embedding, true CFG; its folders load as their own class, `config.sd35.OWN_CLASS_PIPELINES`).

cache (the text states padded to max_sequence_length as the pipeline feeds them; VAE latents
patchified 2x2 and batch-norm normalised) -> train SOAR 2 steps (full and LoRA) -> the pipeline
loads the export (final/ pipeline folder of its own class, final/transformer, load_lora_weights)
-> `sample --pipeline` writes images. A cache of another family is refused in one line.
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

#: pipeline -> (folder fixture, max_sequence_length): the byte-level tokenizers make Mistral's system
#: message ~170 tokens; klein's chat template and caption fit in 48
PIPELINES = {"Flux2Pipeline": ("flux2_dir", 192), "Flux2KleinPipeline": ("flux2_klein_dir", 48)}


@pytest.fixture(scope="module", params=list(PIPELINES))
def flux2(request, caption_folder, tmp_path_factory):
    """(pipeline class name, its tiny folder, a `soar-fast cache` of the caption folder, L)."""
    fixture, length = PIPELINES[request.param]
    folder = request.getfixturevalue(fixture)
    cache = cache_with_cli(folder, caption_folder, tmp_path_factory.mktemp("flux2_cache") / "cache", length)
    return request.param, folder, cache, length


def _probe(transformer):
    return probe_velocity(Flux2VelocityFn, transformer, (1, 16, 4, 4), (1, 7, 48))


def test_cache_is_what_the_pipeline_feeds(flux2):
    import diffusers

    from soar_fast.data.images import image_to_tensor, load_image
    from soar_fast.models.flux2 import latents_to_vae

    name, folder, cache, length = flux2
    index = json.loads((cache / "index.json").read_text())
    assert index["info"]["family"] == "flux2" and index["num_samples"] == 6
    ds = ShardDataset(cache)
    lat, pe, pooled = ds[0]
    assert lat.shape == (16, 4, 4) and pe.shape == (length, 48) and pooled.shape == (0,)
    assert ds.prompt_length(0) is None  # the pipeline feeds all L tokens: nothing to record
    pipe = getattr(diffusers, name).from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        ref_pe, _ = pipe.encode_prompt([ds.caption(0), ""], max_sequence_length=length)  # Mistral or Qwen3 states
        px = image_to_tensor(load_image(ds.source(0)))[None]
        ref = pipe._encode_vae_image(px, generator=None)  # the pipeline's own image -> latents path
        raw = pipe.vae.encode(px).latent_dist.mode()
    torch.testing.assert_close(pe, ref_pe[0])
    torch.testing.assert_close(lat, ref[0])
    torch.testing.assert_close(latents_to_vae(pipe.vae, lat[None]), raw, atol=1e-5, rtol=1e-5)
    u_pe, u_pooled = load_empty_prompt(cache)
    torch.testing.assert_close(u_pe, ref_pe[1])
    assert u_pooled.shape == (0,) and "empty_prompt_length" not in index["info"]


def test_full_and_lora_train_export_sample(flux2, tmp_path):
    import diffusers
    from diffusers import Flux2Transformer2DModel

    name, folder, cache, length = flux2
    check_full_and_lora_train_export_sample("tiny-flux2", folder, cache, tmp_path, getattr(diffusers, name),
                                            Flux2Transformer2DModel, _probe, sample_flags(length, guidance_scale=4.0))
    assert json.loads((tmp_path / "full" / "final" / "model_index.json").read_text())["_class_name"] == name
    config = json.loads((tmp_path / "full" / "final" / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is (name == "Flux2Pipeline")  # klein trains as klein: no distilled guidance


def test_a_cache_of_another_family_is_one_line(flux2_dir, tiny_zimage_cache, tmp_path, capsys):
    """A Z-Image cache (16 channels as FLUX.2's here; Qwen3 width 32 vs Mistral's stacked 48) under
    the FLUX.2 folder: one line, naming the fix."""
    rc, err = train_on_cache_errors("tiny-flux2", flux2_dir, tiny_zimage_cache, tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and "text embeddings are 32 wide" in err[0]
    assert "cache the data with this model's pipeline" in err[0]
