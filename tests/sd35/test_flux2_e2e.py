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
from family_pipelines import build_tiny_flux2_pipeline
from PIL import Image

from soar_fast.cli import main
from soar_fast.data.shards import ShardDataset, load_empty_prompt
from soar_fast.models.flux2 import Flux2VelocityFn

L = 192  # max_sequence_length: the byte-level tokenizer makes the system message ~170 tokens
FAST = ["--train_batch_size", "2", "--soar.num_aux", "1", "--soar.rollout_steps", "2", "--report_to", "none",
        "--logging.no-progress_bar", "--runtime.device", "cpu", "--mixed_precision", "no", "--max_train_steps", "2",
        "--checkpointing_steps", "0", "--learning_rate", "1e-3"]
SAMPLE = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
          "--max_sequence_length", str(L), "--guidance_scale", "4.0"]


def _ok(argv):
    assert main(argv) == 0, argv


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux2")
    build_tiny_flux2_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux2_cache(flux2_dir, caption_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux2_cache") / "cache"
    _ok(["cache", "--pretrained_model_name_or_path", str(flux2_dir), "--data.root", str(caption_folder),
         "--data.resolution", "32", "--output_dir", str(out), "--max_sequence_length", str(L), "--batch_size", "4",
         "--shard_size", "4", "--num_workers", "0", "--no-progress", "--store_dtype", "float32"])
    return out


def _probe(transformer):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return Flux2VelocityFn(transformer)(torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.6]),
                                            (torch.randn(1, 7, 48, generator=g), torch.zeros(1, 0)))


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

    folder = ["--recipe", "tiny-flux2", "--pretrained_model_name_or_path", str(flux2_dir),
              "--data.source", "latents", "--data.data_dir", str(flux2_cache)]
    _ok(["train", *folder, "--output_dir", str(tmp_path / "full"), *FAST])
    final = tmp_path / "full" / "final"
    trained = Flux2Transformer2DModel.from_pretrained(final / "transformer")
    base = Flux2Transformer2DModel.from_pretrained(flux2_dir, subfolder="transformer")
    assert (_probe(trained) - _probe(base)).abs().max() > 1e-5
    pipe = Flux2Pipeline.from_pretrained(final, local_files_only=True)  # the export is a pipeline folder
    torch.testing.assert_close(_probe(pipe.transformer), _probe(trained))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue sky\n", encoding="utf-8")
    _ok(["sample", "--pipeline", str(final), "--prompts", str(prompts), "--output_dir", str(tmp_path / "s1"), *SAMPLE])
    _ok(["sample", "--pipeline", str(flux2_dir), "--transformer", str(final / "transformer"), "--prompts",
         str(prompts), "--output_dir", str(tmp_path / "s2"), *SAMPLE])
    for s in ("s1", "s2"):
        ims = sorted((tmp_path / s).glob("0000*_0.png"))
        assert len(ims) == 2 and Image.open(ims[0]).size == (32, 32) and (tmp_path / s / "grid.png").is_file()
    assert (Image.open(tmp_path / "s1" / "00000_0.png").tobytes() == Image.open(tmp_path / "s2" / "00000_0.png").tobytes())

    _ok(["train", *folder, "--model.lora_rank", "4", "--output_dir", str(tmp_path / "lora"), *FAST])
    lora = Flux2Pipeline.from_pretrained(flux2_dir, local_files_only=True)
    lora.load_lora_weights(tmp_path / "lora" / "final")
    assert any("lora" in n for n, _ in lora.transformer.named_parameters())
    assert (_probe(lora.transformer) - _probe(base)).abs().max() > 1e-6
    _ok(["sample", "--pipeline", str(flux2_dir), "--lora", str(tmp_path / "lora" / "final"), "--prompts",
         str(prompts), "--output_dir", str(tmp_path / "s3"), *SAMPLE])
    assert len(list((tmp_path / "s3").glob("0000*_0.png"))) == 2


def test_a_cache_of_another_family_is_one_line(flux2_dir, tiny_zimage_cache, tmp_path, capsys):
    """A Z-Image cache (16 channels as FLUX.2's here; Qwen3 width 32 vs Mistral's stacked 48) under
    the FLUX.2 folder: one line, naming the fix."""
    rc = main(["train", "--recipe", "tiny-flux2", "--pretrained_model_name_or_path", str(flux2_dir),
               "--data.source", "latents", "--data.data_dir", str(tiny_zimage_cache), "--output_dir",
               str(tmp_path / "r"), *FAST])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2 and len(err) == 1 and "text embeddings are 32 wide" in err[0]
    assert "cache the data with this model's pipeline" in err[0]
