"""Validation images on a latent cache: `soar-fast cache --validation_prompts` -> train with
--validation_steps 2 writes grids at the set steps and a final one, TensorBoard images, and a run
resumed across a validation equals an uninterrupted one; bad inputs are one line."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json

import torch
from safetensors.torch import load_file

from soar_fast.cli import main

FAST = ["--train_batch_size", "2", "--soar.num_aux", "1", "--soar.rollout_steps", "2", "--logging.no-progress_bar",
        "--runtime.device", "cpu", "--mixed_precision", "no", "--learning_rate", "1e-3", "--validation_steps", "2",
        "--logging.validation_inference_steps", "2", "--logging.validation_images_per_class", "1",
        "--model.lora_rank", "2"]


def _bad(capsys, argv, *needles):
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2 and len(err) == 1, (rc, err)
    assert all(n in err[0] for n in needles), err[0]


@pytest.fixture(scope="module")
def val_cache(tiny_sd3_dir, caption_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    prompts = root / "prompts.txt"
    prompts.write_text("a red square\n# a comment\n\na blue sky\n", encoding="utf-8")
    argv = ["cache", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.root", str(caption_folder),
            "--data.resolution", "32", "--output_dir", str(root / "cache"), "--max_sequence_length", "16",
            "--num_workers", "0", "--no-progress", "--validation_prompts", str(prompts)]
    assert main(argv) == 0
    return root / "cache", argv


def test_cache_stores_and_reuses_validation_prompts(val_cache):
    cache, argv = val_cache
    entry = json.loads((cache / "index.json").read_text())["validation"]
    assert entry["prompts"] == ["a red square", "a blue sky"]
    t = load_file(str(cache / "validation.safetensors"))
    assert t["prompt_embeds"].shape == (2, 77 + 16, 32) and t["pooled"].shape == (2, 64)
    before = (cache / "validation.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # a re-run reuses them
    assert (cache / "validation.safetensors").stat().st_mtime_ns == before


def test_train_writes_grids_and_resumes_bitwise(val_cache, tiny_sd3_dir, tmp_path):
    cache, _ = val_cache
    common = ["train", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.source", "latents",
              "--data.data_dir", str(cache), *FAST]
    full = tmp_path / "full"
    assert main([*common, "--max_train_steps", "3", "--output_dir", str(full)]) == 0
    assert sorted(p.name for p in (full / "samples").glob("*.png")) == ["step-000002.png", "step-000003.png"]
    rows = [json.loads(ln) for ln in (full / "samples" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and all(r["seconds"] > 0 for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(full / "logs"))
    ea.Reload()
    assert [e.step for e in ea.Images("samples")] == [2, 3]
    assert "validation/seconds" in ea.Tags()["scalars"]
    split = tmp_path / "split"
    assert main([*common, "--max_train_steps", "2", "--output_dir", str(split)]) == 0
    assert main([*common, "--max_train_steps", "3", "--output_dir", str(split), "--resume"]) == 0
    a = load_file(str(full / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "final" / "pytorch_lora_weights.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input(capsys, val_cache, tiny_cache, tiny_sd3_dir, caption_folder, tmp_path):
    cache_cfg, _ = tiny_cache
    _bad(capsys, ["train", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.source", "latents",
                  "--data.data_dir", cache_cfg.output_dir, "--output_dir", str(tmp_path / "r"), *FAST,
                  "--max_train_steps", "1"], "holds no validation prompts", "--validation_prompts FILE")
    base = ["cache", "--pretrained_model_name_or_path", str(tiny_sd3_dir), "--data.root", str(caption_folder),
            "--data.resolution", "32", "--output_dir", str(tmp_path / "c"), "--no-progress"]
    _bad(capsys, [*base, "--validation_prompts", str(tmp_path / "nope.txt")], "no such file", "one prompt a line")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    _bad(capsys, [*base, "--validation_prompts", str(tmp_path / "empty.txt")], "holds no prompts")
