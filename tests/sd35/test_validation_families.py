"""Validation grids for the other image families (issue 17 item 1 beyond SD3): `soar-fast cache
--validation_prompts` on a tiny FLUX.1, Z-Image, Qwen-Image and FLUX.2 pipeline (pooled / no pooled
embedding, per-prompt lengths, each family's VAE normalisation and latent packing), then `soar-fast train --validation_steps 1` samples them through the
family's velocity and VAE decoder: a grid per set step, non-constant images of the cache's size."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import numpy as np
from family_pipelines import (
    FAST_TRAIN,
    run_ok,
)
from PIL import Image


@pytest.mark.parametrize("family, pipe_fixture, recipe, msl", [
    ("flux", "tiny_flux_dir", "tiny-flux", 16),
    ("zimage", "tiny_zimage_dir", "tiny-zimage", 32),
    ("qwenimage", "qwen_dir", "tiny-qwenimage", 160),  # the tests' byte-level tokenizer: long templates
    ("flux2", "flux2_dir", "tiny-flux2", 192),
])
def test_validation_grids_per_family(family, pipe_fixture, recipe, msl, caption_folder, tmp_path, request,
                                     monkeypatch, caplog):
    from soar_fast.train.validation import LatentValidation

    seen, schedules = [], []  # (guidance in the velocity's embedding, distilled), σ schedule of each validation
    run = LatentValidation.run

    def spy(self, velocity_fn, *args, **kw):
        seen.append((getattr(velocity_fn, "guidance", None), kw.get("distilled")))
        schedules.append(self.sigmas)
        return run(self, velocity_fn, *args, **kw)

    monkeypatch.setattr(LatentValidation, "run", spy)
    pipe_dir = request.getfixturevalue(pipe_fixture)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue sky\n", encoding="utf-8")
    cache = tmp_path / "cache"
    run_ok(["cache", "--pretrained_model_name_or_path", str(pipe_dir), "--data.root", str(caption_folder),
            "--data.resolution", "32", "--output_dir", str(cache), "--max_sequence_length", str(msl),
            "--batch_size", "4", "--shard_size", "4", "--num_workers", "0", "--no-progress",
            "--store_dtype", "float32", "--validation_prompts", str(prompts)])
    run_ok(["train", "--recipe", recipe, "--pretrained_model_name_or_path", str(pipe_dir), "--data.source", "latents",
            "--data.data_dir", str(cache), "--output_dir", str(tmp_path / "run"), *FAST_TRAIN,
            "--validation_steps", "1", "--logging.validation_inference_steps", "2",
            "--logging.validation_images_per_class", "1", "--logging.validation_guidance_scale", "2.5"])
    # FLUX.1 / FLUX.2 dev are guidance-distilled: validation samples as their pipelines do, the scale in the
    # embedding and no CFG pass; the others run true CFG at that scale
    distilled = family in ("flux", "flux2")
    assert seen and all(s == ((2.5, True) if distilled else (None, False)) for s in seen), seen
    # a pipeline that samples this size with another shift than the recipe's --soar.shift says so in one warning
    from soar_fast.config import get_recipe
    from soar_fast.data.latents import LatentsDataset
    from soar_fast.models.schedules import effective_shift

    shift = effective_shift(pipe_dir, family, 2, tuple(LatentsDataset(str(cache)).sample_shape))  # 2 rollout steps
    warned = [r.getMessage() for r in caplog.records if "--soar.shift" in r.getMessage()]
    if abs(shift - get_recipe(recipe).soar.shift) > 0.1 * shift:
        assert len(warned) == 1 and f"shift {shift:.2f}" in warned[0], warned
    else:
        assert not warned, warned
    # the σ schedule is the family's pipeline's own at this size (dynamic shift from the image tokens)
    import diffusers
    import torch

    from soar_fast.config.sd35 import pipeline_class_name

    pipe = getattr(diffusers, pipeline_class_name(pipe_dir)).from_pretrained(pipe_dir, local_files_only=True)
    pipe(prompt="a red square", num_inference_steps=2, height=32, width=32, max_sequence_length=msl,
         output_type="latent", **({"guidance_scale": 1.0} if family != "qwenimage" else {}))
    torch.testing.assert_close(schedules[0], pipe.scheduler.sigmas.float().cpu())
    grids = sorted((tmp_path / "run" / "samples").glob("step-*.png"))
    assert [g.name for g in grids][:2] == ["step-000001.png", "step-000002.png"], grids
    img = np.asarray(Image.open(grids[-1]).convert("RGB"))
    assert img.shape[0] >= 32 and img.shape[1] >= 2 * 32 and img.std() > 0  # two 32 px images, not blank
