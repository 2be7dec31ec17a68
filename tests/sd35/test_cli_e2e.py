"""The SD3.5 path through `soar-fast` commands only, on the tiny random pipeline of conftest.py:

cache -> train (full fine-tune, 2 steps) -> final/transformer loads into StableDiffusion3Pipeline
-> `sample --pipeline --transformer` writes a grid; and train --model.lora_rank 4 (2 steps with a
checkpoint, resume for a 3rd, bitwise equal to 3 straight steps) -> the LoRA file loads with
`load_lora_weights` -> `sample --lora`. Plus the bad inputs of this path (one line, exit 2).
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from sd35_helpers import make_caption_folder

from soar_fast.cli import main

# Small SOAR so that a step takes well under a second on CPU; the cache keeps the default bf16 storage.
FAST = ["--train_batch_size", "2", "--soar.num_aux", "1", "--soar.rollout_steps", "2", "--report_to", "none",
        "--logging.no-progress_bar", "--runtime.device", "cpu", "--mixed_precision", "no"]
SAMPLE = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]


def _ok(argv):
    assert main(argv) == 0, argv


def _bad(capsys, argv, *needles):
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2, f"{argv} exited {rc}"
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def cli_cache(tiny_sd3_dir, caption_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_cache") / "cache"
    _ok(["cache", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.root", str(caption_folder),
         "--data.resolution", "32", "--output_dir", str(out), "--max_sequence_length", "16", "--batch_size", "4",
         "--shard_size", "4", "--num_workers", "0", "--no-progress"])
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red square\na blue sky\n", encoding="utf-8")
    return p


def test_cache_cli_writes_a_cache(cli_cache):
    index = json.loads((cli_cache / "index.json").read_text())
    assert sum(s["num_samples"] for s in index["shards"]) == 6
    assert (cli_cache / "empty_prompt.safetensors").is_file()


def test_full_finetune_chain(tiny_sd3_dir, cli_cache, prompt_file, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    run = tmp_path / "full"
    _ok(["train", "--recipe", "sd35m-soar", "--pretrained_model_name_or_path", str(tiny_sd3_dir),
         "--data.data_dir", str(cli_cache), "--max_train_steps", "2", "--gradient_accumulation_steps", "1",
         "--output_dir", str(run), *FAST])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["recipe"] == "sd35m-soar" and cfg["optim"]["learning_rate"] == 2e-5
    trained = SD3Transformer2DModel.from_pretrained(run / "final" / "transformer")
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert moved, "two AdamW steps at lr 2e-5 changed no weight"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, transformer=trained)
    assert pipe.transformer is trained
    # final/ is a pipeline folder: the trained transformer, the other components linked from the source
    whole = StableDiffusion3Pipeline.from_pretrained(run / "final", local_files_only=True)
    assert all(torch.equal(p, trained.get_parameter(n)) for n, p in whole.transformer.named_parameters())
    vae = run / "final" / "vae" / "diffusion_pytorch_model.safetensors"
    assert vae.is_file() and vae.stat().st_ino == (tiny_sd3_dir / "vae" / vae.name).stat().st_ino  # linked
    image = whole(prompt="a red square", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape[-1] == 3 and np.isfinite(image).all()

    out = tmp_path / "samples"
    _ok(["sample", "--pipeline", str(tiny_sd3_dir), "--transformer", str(run / "final" / "transformer"),
         "--prompts", str(prompt_file), "--output_dir", str(out), *SAMPLE])
    grid = Image.open(out / "grid.png")
    assert grid.size[0] >= 32 and json.loads((out / "prompts.json").read_text()) == ["a red square", "a blue sky"]
    assert sorted(p.name for p in out.glob("0000*_0.png")) == ["00000_0.png", "00001_0.png"]


def test_lora_chain_with_resume(tiny_sd3_dir, cli_cache, prompt_file, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    common = ["train", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.source", "latents",
              "--data.data_dir", str(cli_cache), "--model.lora_rank", "4", "--checkpointing_steps", "2", *FAST]
    run = tmp_path / "lora"
    _ok([*common, "--max_train_steps", "2", "--output_dir", str(run)])
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(run / "checkpoints" / "step_00000002")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    # adapters only (peft key names), plus the model's buffers; no frozen base weight
    assert model_keys and all(".lora_A." in k or ".lora_B." in k or "pos_embed.pos_embed" in k for k in model_keys)
    _ok([*common, "--max_train_steps", "3", "--output_dir", str(run), "--resume"])
    straight = tmp_path / "lora3"
    _ok([*common, "--max_train_steps", "3", "--output_dir", str(straight)])
    lora_file = run / "final" / "pytorch_lora_weights.safetensors"
    a, b = load_file(str(lora_file)), load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # 2 + resume + 1 == 3
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # B starts at 0: the adapters trained
    assert not (run / "final" / "transformer").exists()

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(run / "final")
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert len(list(pipe.transformer.named_parameters())) > len(before)

    out = tmp_path / "samples"
    _ok(["sample", "--pipeline", str(tiny_sd3_dir), "--lora", str(run / "final"), "--prompts", str(prompt_file),
         "--output_dir", str(out), *SAMPLE])
    assert (out / "grid.png").is_file()


def test_bad_input(capsys, tiny_sd3_dir, caption_folder, cli_cache, tmp_path):
    _bad(capsys, ["cache", "--pretrained_model_name_or_path", str(caption_folder), "--data.root",
                  str(caption_folder), "--output_dir", str(tmp_path / "c")], "no model_index.json")
    assert not (tmp_path / "c").exists()
    _bad(capsys, ["cache", "--data.root", str(caption_folder), "--output_dir", str(tmp_path / "c")],
         "pretrained_model_name_or_path")
    _bad(capsys, ["train", "--recipe", "sd35m-soar", "--pretrained_model_name_or_path", str(tiny_sd3_dir)],
         "--data.data_dir")
    _bad(capsys, ["train", "--recipe", "sd35m-soar", "--data.data_dir", str(cli_cache)],
         "--pretrained_model_name_or_path")
    _bad(capsys, ["train", "--model.lora_rank", "-2"], "model.lora_rank=-2")
    _bad(capsys, ["train", "--model.lora_alpha", "8"], "model.lora_rank=0", "--model.lora_rank >= 1")
    _bad(capsys, ["sample", "--pipeline", str(tiny_sd3_dir), "--lora", str(tmp_path / "nope"), "--prompts",
                  "a cat", "--output_dir", str(tmp_path / "s")], "--lora", "does not exist")


def test_bucketed_cache_trains_one_bucket_per_batch(tiny_sd3_dir, tmp_path):
    """An aspect-bucketed cache (two latent shapes) trains: every batch comes from one bucket."""
    images = make_caption_folder(tmp_path / "imgs", n=4, sizes=[(32, 32), (48, 24), (32, 32), (48, 24)])
    cache = tmp_path / "bucketed"
    _ok(["cache", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.root", str(images),
         "--data.resolution", "32", "--data.aspect_buckets", "--data.bucket_step", "8", "--output_dir", str(cache),
         "--max_sequence_length", "8", "--num_workers", "0", "--no-progress"])
    from soar_fast.data.latents import LatentsDataset

    ds = LatentsDataset(str(cache))
    assert ds.groups is not None and len(set(ds.groups)) == 2
    _ok(["train", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.source", "latents",
         "--data.data_dir", str(cache), "--output_dir", str(tmp_path / "run"), "--max_train_steps", "3", *FAST])
    assert (tmp_path / "run" / "final" / "transformer").exists()
