"""FLUX.1 Kontext end to end through `soar-fast` commands, on the tiny Flux pipeline saved as a
FluxKontextPipeline folder: a folder of images + captions and a folder of their reference (input)
images -> `soar-fast cache --reference_root` (the references' latents as FluxKontextPipeline's
`_encode_vae_image` makes them) -> `soar-fast train` SOAR 2 steps (full and LoRA; the reference
tokens in every model call) -> FluxKontextPipeline loads the export and `sample --image` edits an
image. Bad input: a Kontext folder without references, references for a text-to-image folder, a
Kontext pipeline sampled without an image: one line each."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import json
import re
import shutil

import torch
from family_pipelines import FAST_TRAIN, run_ok
from safetensors.torch import load_file
from sd35_helpers import write_image

from soar_fast.cli import main

L = 16
SAMPLE = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--device", "cpu",
          "--max_sequence_length", str(L), "--guidance_scale", "2.5"]


@pytest.fixture(scope="module")
def kontext_dir(tiny_flux_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_kontext") / "pipe"
    shutil.copytree(tiny_flux_dir, path)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    return path


@pytest.fixture(scope="module")
def references(caption_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    for i, img in enumerate(sorted(caption_folder.glob("*.png"))):
        write_image(root / img.with_suffix(".jpg" if i == 0 else ".png").name, seed=100 + i)  # any extension
    return root


def _cache_argv(pipe_dir, images, out, *extra):
    return ["cache", "--pretrained_model_name_or_path", str(pipe_dir), "--data.root", str(images),
            "--data.resolution", "32", "--output_dir", str(out), "--max_sequence_length", str(L),
            "--batch_size", "4", "--shard_size", "4", "--num_workers", "0", "--no-progress",
            "--store_dtype", "float32", *extra]


@pytest.fixture(scope="module")
def kontext_cache(kontext_dir, caption_folder, references, tmp_path_factory):
    out = tmp_path_factory.mktemp("kontext_cache") / "cache"
    run_ok(_cache_argv(kontext_dir, caption_folder, out, "--reference_root", str(references)))
    return out


def test_cache_holds_each_images_reference_latents(kontext_cache, kontext_dir, references):
    from diffusers import FluxKontextPipeline

    from soar_fast.data.images import image_to_tensor, load_image
    from soar_fast.data.latents import LatentsDataset

    index = json.loads((kontext_cache / "index.json").read_text())
    assert index["info"]["family"] == "flux" and index["info"]["reference_root"] == str(references.resolve())
    shard = load_file(str(kontext_cache / index["shards"][0]["file"]))
    assert shard["reference"].shape == shard["latents"].shape == (4, 4, 16, 16)
    pipe = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    ref_px = image_to_tensor(load_image(str(sorted(references.glob("*"))[0])))[None]
    with torch.no_grad():
        want = pipe._encode_vae_image(ref_px, generator=None)  # (mode - shift) * scale
    torch.testing.assert_close(shard["reference"][0], want[0], rtol=1e-5, atol=1e-5)
    ds = LatentsDataset(str(kontext_cache))
    _, cond, _ = ds.batch(torch.arange(2))
    assert len(cond) == 3 and cond[2].shape == (2, 4, 16, 16) and ds.uncond()[2] is None


def test_train_full_and_lora_then_the_kontext_pipeline_edits(kontext_dir, kontext_cache, tmp_path, references):
    from diffusers import FluxKontextPipeline
    from PIL import Image

    folder = ["--recipe", "tiny-flux", "--pretrained_model_name_or_path", str(kontext_dir), "--data.source",
              "latents", "--data.data_dir", str(kontext_cache)]
    run_ok(["train", *folder, "--output_dir", str(tmp_path / "full"), *FAST_TRAIN])
    final = tmp_path / "full" / "final"
    assert json.loads((final / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    pipe = FluxKontextPipeline.from_pretrained(final, local_files_only=True)
    image = Image.open(sorted(references.glob("*.png"))[0]).convert("RGB")
    out = pipe(prompt="make it red", image=image, num_inference_steps=2, height=32, width=32, max_area=32 * 32,
               _auto_resize=False, max_sequence_length=L, output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    ref = str(sorted(references.glob("*.png"))[0])
    run_ok(["sample", "--pipeline", str(final), "--image", ref, "--prompts", "make it red", "make it blue",
            "--output_dir", str(tmp_path / "s1"), *SAMPLE])
    assert len(list((tmp_path / "s1").glob("0000*_0.png"))) == 2

    run_ok(["train", *folder, "--model.lora_rank", "4", "--output_dir", str(tmp_path / "lora"), *FAST_TRAIN])
    run_ok(["sample", "--pipeline", str(kontext_dir), "--lora", str(tmp_path / "lora" / "final"), "--image", ref,
            "--prompts", "make it red", "--output_dir", str(tmp_path / "s2"), *SAMPLE])
    assert (tmp_path / "s2" / "00000_0.png").is_file()


def test_references_of_their_own_aspect_ratio(kontext_dir, caption_folder, tmp_path):
    """`--reference_size own` with aspect buckets: each input image keeps its own aspect ratio (an edit may
    change it); shards group by (image bucket, reference bucket), batches never mix reference shapes, and SOAR
    trains on the cache (the reference tokens at their own grid)."""
    from soar_fast.data.latents import LatentsDataset

    refs = tmp_path / "refs"
    refs.mkdir()
    for i, img in enumerate(sorted(caption_folder.glob("*.png"))):  # 32 x 32 images; references 64 x 32 or square
        write_image(refs / img.name, size=(64, 32) if i % 2 else (32, 32), seed=200 + i)
    cache = tmp_path / "cache"
    argv = _cache_argv(kontext_dir, caption_folder, cache, "--reference_root", str(refs), "--reference_size", "own",
                       "--data.aspect_buckets", "--data.bucket_step", "16")
    argv[argv.index("--data.resolution") + 1] = "48"
    run_ok(argv)
    index = json.loads((cache / "index.json").read_text())
    assert index["info"]["reference_size"] == "own"
    shapes = sorted((tuple(e["tensors"]["latents"]["shape"][1:]), tuple(e["tensors"]["reference"]["shape"][1:]),
                     e["num_samples"]) for e in index["shards"])
    assert shapes == [((4, 24, 24), (4, 16, 32), 3), ((4, 24, 24), (4, 24, 24), 3)]  # 48 x 48 out; 32 x 64 / 48 x 48 in
    ds = LatentsDataset(str(cache))
    assert ds.groups is not None and len(set(ds.groups)) == 2
    run_ok(["train", "--recipe", "tiny-flux", "--pretrained_model_name_or_path", str(kontext_dir), "--data.source",
            "latents", "--data.data_dir", str(cache), "--output_dir", str(tmp_path / "run"), *FAST_TRAIN])
    assert (tmp_path / "run" / "final" / "transformer").is_dir()


def test_bad_kontext_input_is_one_line(kontext_dir, tiny_flux_dir, caption_folder, references, tmp_path, capsys):
    def bad(argv, *needles):
        rc = main(argv)
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast")]
        assert rc == 2 and len(err) == 1 and all(n in err[0] for n in needles), err

    bad(_cache_argv(kontext_dir, caption_folder, tmp_path / "c1"), "Kontext", "--reference_root")
    bad(_cache_argv(tiny_flux_dir, caption_folder, tmp_path / "c2", "--reference_root", str(references)),
        "--reference_root", "drop it")
    bad(_cache_argv(tiny_flux_dir, caption_folder, tmp_path / "c2", "--reference_size", "own"), "--reference_size",
        "drop it")
    bad(["sample", "--pipeline", str(kontext_dir), "--prompts", "x", "--output_dir", str(tmp_path / "s"), *SAMPLE],
        "--image")
    bad(["sample", "--pipeline", str(tiny_flux_dir), "--image", str(sorted(references.glob("*.png"))[0]), "--prompts",
         "x", "--output_dir", str(tmp_path / "s"), *SAMPLE], "--image", "drop it")


def test_validation_edits_of_a_kontext_cache(kontext_dir, kontext_cache, references, tiny_flux_dir, caption_folder,
                                             tmp_path, capsys):
    """`--validation_prompts edits.jsonl` (prompt + input image rows) adds the edits to a Kontext cache (its
    shards kept): the images' latents as the shards' references; `train --validation_steps 1` writes a grid
    of the inputs over their edits. A .txt for a Kontext folder, images for a text-to-image folder and a
    Kontext cache without edits are one line each."""
    from PIL import Image

    cache = tmp_path / "cache"
    shutil.copytree(kontext_cache, cache)
    refs = sorted(references.glob("*.png"))[:2]
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"prompt": f"make it blue {i}", "image": str(r)}) + "\n"
                             for i, r in enumerate(refs)), encoding="utf-8")
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")}
    run_ok(_cache_argv(kontext_dir, caption_folder, cache, "--reference_root", str(references),
                       "--validation_prompts", str(edits)))
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")} == before
    entry = json.loads((cache / "index.json").read_text())["validation"]
    assert entry["prompts"] == ["make it blue 0", "make it blue 1"] and entry["images"] == [str(r.resolve()) for r in refs]
    val = load_file(str(cache / "validation.safetensors"))
    shard = load_file(str(sorted(cache.glob("shard-*.safetensors"))[0]))
    assert val["reference"].shape == (2, *shard["reference"].shape[1:])
    assert shard["reference"].shape[1:] == shard["latents"].shape[1:]

    out = tmp_path / "run"
    run_ok(["train", "--recipe", "tiny-flux", "--pretrained_model_name_or_path", str(kontext_dir), "--data.source",
            "latents", "--data.data_dir", str(cache), "--output_dir", str(out), *FAST_TRAIN, "--validation_steps", "1",
            "--logging.validation_images_per_class", "1", "--logging.validation_inference_steps", "2"])
    grid = Image.open(out / "samples" / "step-000001.png")
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 edits: the inputs' row over the edits' row, pad 2

    def bad(argv, *needles):
        rc = main(argv)
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast")]
        assert rc == 2 and len(err) == 1 and all(n in err[0] for n in needles), (rc, err)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    bad(_cache_argv(kontext_dir, caption_folder, tmp_path / "c1", "--reference_root", str(references),
                    "--validation_prompts", str(prompts)), "input image per prompt", ".jsonl")
    bad(_cache_argv(tiny_flux_dir, caption_folder, tmp_path / "c2", "--validation_prompts", str(edits)),
        "input images are for FLUX.1 Kontext", "pass a .txt of prompts")
    bad(["train", "--recipe", "tiny-flux", "--pretrained_model_name_or_path", str(kontext_dir), "--data.source",
         "latents", "--data.data_dir", str(kontext_cache), "--output_dir", str(tmp_path / "r"), *FAST_TRAIN,
         "--validation_steps", "1", "--logging.validation_images_per_class", "1"],
        "holds no validation edits", "--validation_prompts EDITS.jsonl")


def test_plan_counts_the_reference_tokens(kontext_dir, kontext_cache, tiny_flux_dir, caption_folder, tmp_path, capsys):
    """`soar-fast plan` on a Kontext cache plans image + reference tokens (2 x 64 for 16 x 16 latents), twice
    the text-to-image cache's."""
    plain = tmp_path / "plain"
    run_ok(_cache_argv(tiny_flux_dir, caption_folder, plain))
    capsys.readouterr()
    tokens = {}
    for name, pipe, cache in (("kontext", kontext_dir, kontext_cache), ("plain", tiny_flux_dir, plain)):
        assert main(["plan", "--recipe", "tiny-flux", "--pretrained_model_name_or_path", str(pipe), "--data.source",
                     "latents", "--data.data_dir", str(cache)]) == 0
        tokens[name] = int(re.search(r"(\d+) tokens per sample", capsys.readouterr().out)[1])
    assert tokens["kontext"] == 2 * 64 + L and tokens["plain"] == 64 + L
