"""FLUX.2 [klein] end to end through `soar-fast` commands, on a tiny Flux2KleinPipeline built locally:

klein is FLUX.2 with a Qwen3 text encoder (hidden states 9, 18, 27 stacked, padded to
max_sequence_length as the pipeline feeds them) and no guidance embedding (true CFG). The folder
loads as its own class for `cache` and `sample` (`config.sd35.OWN_CLASS_PIPELINES`): cache -> train
SOAR 2 steps (full and LoRA; the rollout is true CFG) -> Flux2KleinPipeline loads the export ->
`sample --pipeline` writes images.
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
)

from soar_fast.data.shards import ShardDataset, load_empty_prompt
from soar_fast.models.flux2 import Flux2VelocityFn

L = 48  # max_sequence_length: the byte-level tokenizer's chat template and caption fit in it
SAMPLE = sample_flags(L, guidance_scale=4.0)


@pytest.fixture(scope="module")
def klein_cache(flux2_klein_dir, caption_folder, tmp_path_factory):
    return cache_with_cli(flux2_klein_dir, caption_folder, tmp_path_factory.mktemp("klein_cache") / "cache", L)


def _probe(transformer):
    return probe_velocity(Flux2VelocityFn, transformer, (1, 16, 4, 4), (1, 7, 48))


def test_cache_is_what_klein_pipeline_feeds(klein_cache, flux2_klein_dir):
    from diffusers import Flux2KleinPipeline

    from soar_fast.data.images import image_to_tensor, load_image

    index = json.loads((klein_cache / "index.json").read_text())
    assert index["info"]["family"] == "flux2" and index["num_samples"] == 6
    ds = ShardDataset(klein_cache)
    lat, pe, pooled = ds[0]
    assert lat.shape == (16, 4, 4) and pe.shape == (L, 48) and pooled.shape == (0,)
    pipe = Flux2KleinPipeline.from_pretrained(flux2_klein_dir, local_files_only=True)
    with torch.no_grad():
        ref_pe, _ = pipe.encode_prompt([ds.caption(0), ""], max_sequence_length=L)
        ref = pipe._encode_vae_image(image_to_tensor(load_image(ds.source(0)))[None], generator=None)
    torch.testing.assert_close(pe, ref_pe[0])  # Qwen3 states, not the Mistral path of Flux2Pipeline
    torch.testing.assert_close(lat, ref[0])
    u_pe, _ = load_empty_prompt(klein_cache)
    torch.testing.assert_close(u_pe, ref_pe[1])


def test_full_and_lora_train_export_sample(flux2_klein_dir, klein_cache, tmp_path):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    check_full_and_lora_train_export_sample("tiny-flux2", flux2_klein_dir, klein_cache, tmp_path, Flux2KleinPipeline,
                                            Flux2Transformer2DModel, _probe, SAMPLE)
    index = json.loads((tmp_path / "full" / "final" / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    config = json.loads((tmp_path / "full" / "final" / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False  # trained as klein: no distilled guidance crept in
