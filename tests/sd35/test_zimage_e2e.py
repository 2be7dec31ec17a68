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
from PIL import Image

from soar_fast.cli import main
from soar_fast.data.shards import ShardDataset, load_empty_prompt
from soar_fast.models.zimage import ZImageVelocityFn

L = 32  # max_sequence_length: the longest caption is 32 chat-templated tokens
FAST = ["--train_batch_size", "2", "--soar.num_aux", "1", "--soar.rollout_steps", "2", "--report_to", "none",
        "--logging.no-progress_bar", "--runtime.device", "cpu", "--mixed_precision", "no", "--max_train_steps", "2",
        "--checkpointing_steps", "0", "--learning_rate", "1e-3"]
SAMPLE = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
          "--max_sequence_length", str(L), "--guidance_scale", "1.0"]


def _ok(argv):
    assert main(argv) == 0, argv


@pytest.fixture(scope="module")
def zimage_dir(tiny_zimage_dir):
    return tiny_zimage_dir


@pytest.fixture(scope="module")
def zimage_cache(tiny_zimage_cache):  # `soar-fast cache ... --max_sequence_length 32` (conftest.py)
    return tiny_zimage_cache


def _probe(transformer):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return ZImageVelocityFn(transformer)(torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]),
                                             (torch.randn(1, 7, 32, generator=g), torch.zeros(1, 0)))


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


def test_full_and_lora_train_export_sample(zimage_dir, zimage_cache, tmp_path):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    folder = ["--recipe", "tiny-zimage", "--pretrained_model_name_or_path", str(zimage_dir),
              "--data.source", "latents", "--data.data_dir", str(zimage_cache)]
    _ok(["train", *folder, "--output_dir", str(tmp_path / "full"), *FAST])
    final = tmp_path / "full" / "final"
    trained = ZImageTransformer2DModel.from_pretrained(final / "transformer")
    base = ZImageTransformer2DModel.from_pretrained(zimage_dir, subfolder="transformer")
    assert (_probe(trained) - _probe(base)).abs().max() > 1e-5
    pipe = ZImagePipeline.from_pretrained(final, local_files_only=True)  # the export is a pipeline folder
    torch.testing.assert_close(_probe(pipe.transformer), _probe(trained))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue sky\n", encoding="utf-8")
    _ok(["sample", "--pipeline", str(final), "--prompts", str(prompts), "--output_dir", str(tmp_path / "s1"), *SAMPLE])
    _ok(["sample", "--pipeline", str(zimage_dir), "--transformer", str(final / "transformer"), "--prompts",
         str(prompts), "--output_dir", str(tmp_path / "s2"), *SAMPLE])
    for s in ("s1", "s2"):
        ims = sorted((tmp_path / s).glob("0000*_0.png"))
        assert len(ims) == 2 and Image.open(ims[0]).size == (32, 32) and (tmp_path / s / "grid.png").is_file()
    assert (Image.open(tmp_path / "s1" / "00000_0.png").tobytes() == Image.open(tmp_path / "s2" / "00000_0.png").tobytes())

    _ok(["train", *folder, "--model.lora_rank", "4", "--output_dir", str(tmp_path / "lora"), *FAST])
    lora = ZImagePipeline.from_pretrained(zimage_dir, local_files_only=True)
    lora.load_lora_weights(tmp_path / "lora" / "final")
    assert any("lora" in n for n, _ in lora.transformer.named_parameters())
    assert (_probe(lora.transformer) - _probe(base)).abs().max() > 1e-6
    _ok(["sample", "--pipeline", str(zimage_dir), "--lora", str(tmp_path / "lora" / "final"), "--prompts",
         str(prompts), "--output_dir", str(tmp_path / "s3"), *SAMPLE])
    assert len(list((tmp_path / "s3").glob("0000*_0.png"))) == 2


def test_a_cache_of_another_family_is_one_line(zimage_dir, tiny_cache, tmp_path, capsys):
    """The SD3 cache (4 latent channels, T5 width 32 + pooled 64) under the Z-Image folder: one line."""
    sd3_cache = tiny_cache[0].output_dir
    rc = main(["train", "--recipe", "tiny-zimage", "--pretrained_model_name_or_path", str(zimage_dir),
               "--data.source", "latents", "--data.data_dir", sd3_cache, "--output_dir", str(tmp_path / "r"), *FAST])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2 and len(err) == 1 and "channels" in err[0] and "data.source" in err[0]
