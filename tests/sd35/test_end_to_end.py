"""cache -> SOAR training (full and LoRA) -> export -> load into StableDiffusion3Pipeline -> sample.

The training loop is a minimal one of the test's own: `soar_fast.soar_loss` on batches of the
trainer's batch stream over the cache (DataLoader workers), AdamW, grad clipping. Everything runs on CPU on the tiny random pipeline.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import itertools

import numpy as np
import torch
from PIL import Image

from soar_fast import SoarConfig, soar_loss
from soar_fast.data.latents import LatentsDataset
from soar_fast.data.loader import BatchStream, ResumableSampler
from soar_fast.data.shards import load_empty_prompt
from soar_fast.models.lora import (
    LoraSettings,
    apply_lora,
    merge_lora,
    save_lora_weights,
    trainable_parameters,
)
from soar_fast.models.pipeline import export_transformer, load_pipeline, load_sd3_transformer
from soar_fast.models.sampling import SampleConfig, run_sample
from soar_fast.models.sd3 import SD3VelocityFn

PROMPTS = ["a red square", "a blue sky"]


def _train(transformer, cache_dir, steps=3, lr=1e-3):
    ds = LatentsDataset(cache_dir)
    stream = BatchStream(ds, ResumableSampler(len(ds), 2, seed=0, groups=ds.groups), num_workers=2)
    uncond = load_empty_prompt(cache_dir)
    params = trainable_parameters(transformer)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2)
    vf = SD3VelocityFn(transformer)
    cfg = SoarConfig(num_aux=2)
    gen = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in params]
    metrics = []
    transformer.train()
    for _, (lat, (pe, pooled), _) in itertools.islice(stream, steps):
        assert lat.shape == (2, 4, 16, 16) and pe.shape == (2, 93, 32) and pooled.shape == (2, 64)
        out = soar_loss(vf, lat, (pe, pooled), uncond, cfg, gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        metrics.append(out.metrics)
    stream.close()
    transformer.eval()
    assert all(np.isfinite(m["loss"]) and m["aux_loss"] > 0 for m in metrics)
    assert max((p - b).abs().max().item() for p, b in zip(params, before, strict=True)) > 1e-4
    return metrics


def _probe(transformer):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 4, 16, 16, generator=g),
                           encoder_hidden_states=torch.randn(1, 93, 32, generator=g),
                           pooled_projections=torch.randn(1, 64, generator=g),
                           timestep=torch.tensor([500.0]), return_dict=False)[0]


def _sample(tmp_path, name, **kw):
    cfg = SampleConfig(output_dir=str(tmp_path / name), prompts=PROMPTS, max_sequence_length=16, **kw)
    assert (cfg.num_inference_steps, cfg.guidance_scale) == (40, 4.5)  # the SOAR evaluation defaults
    cfg.num_inference_steps = 10  # CPU time
    res = run_sample(cfg)
    grid = Image.open(res.grid_path)
    assert grid.size == (2 * 32 + 2, 32) and len(res.image_paths) == 2
    return np.stack([np.asarray(im) for im in res.images])


def test_full_finetune_export_load_sample(tiny_cache, tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    cache_cfg, _ = tiny_cache
    transformer = load_sd3_transformer(tiny_sd3_dir)
    _train(transformer, cache_cfg.output_dir)
    out = export_transformer(transformer, tmp_path / "export", base=tiny_sd3_dir)

    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(_probe(pipe.transformer), _probe(transformer))
    base_imgs = _sample(tmp_path, "base", pretrained_model_name_or_path=str(tiny_sd3_dir))
    new_imgs = _sample(tmp_path, "trained", pretrained_model_name_or_path=str(out))
    assert not np.array_equal(base_imgs, new_imgs)
    # The transformer-only export plugs into the base pipeline and gives the same images.
    only = export_transformer(transformer, tmp_path / "only", mode="transformer")
    swapped = _sample(tmp_path, "swapped", pretrained_model_name_or_path=str(tiny_sd3_dir), transformer_path=str(only))
    np.testing.assert_array_equal(swapped, new_imgs)


def test_lora_train_save_load_sample(tiny_cache, tiny_sd3_dir, tmp_path):
    cache_cfg, _ = tiny_cache
    transformer = apply_lora(load_sd3_transformer(tiny_sd3_dir), LoraSettings(rank=4, lora_alpha=8.0))
    _train(transformer, cache_cfg.output_dir, lr=1e-2)
    lora_dir = tmp_path / "lora"
    save_lora_weights(transformer, lora_dir)

    pipe = load_pipeline(tiny_sd3_dir, lora_path=lora_dir)
    torch.testing.assert_close(_probe(pipe.transformer), _probe(transformer), atol=1e-5, rtol=1e-5)
    lora_imgs = _sample(tmp_path, "lora", pretrained_model_name_or_path=str(tiny_sd3_dir), lora_path=str(lora_dir))
    base_imgs = _sample(tmp_path, "base", pretrained_model_name_or_path=str(tiny_sd3_dir))
    assert not np.array_equal(base_imgs, lora_imgs)

    # Merged into full weights, the export samples like the LoRA pipeline.
    out = export_transformer(merge_lora(transformer), tmp_path / "merged", base=tiny_sd3_dir, link_components=True)
    assert (out / "vae").is_symlink() and not (out / "transformer").is_symlink()
    merged_imgs = _sample(tmp_path, "merged", pretrained_model_name_or_path=str(out))
    assert np.abs(merged_imgs.astype(int) - lora_imgs.astype(int)).max() <= 2


def test_builtin_exposure_bias_runs_on_cached_sd3_data(tiny_cache, tiny_sd3_dir):
    """The built-in metric needs no external scorer: the SD3 adapter plus a cached batch."""
    from soar_fast.eval.metrics import exposure_bias

    cache_cfg, _ = tiny_cache
    ds = LatentsDataset(cache_cfg.output_dir)
    z0, (pe, pooled), _ = ds.batch(torch.arange(3))
    vf = SD3VelocityFn(load_sd3_transformer(tiny_sd3_dir))
    out = exposure_bias(vf, z0, (pe, pooled), load_empty_prompt(cache_cfg.output_dir), num_steps=8,
                        guidance_scale=4.5, shift=3.0, window=2, num_sigmas=3, seed=0)
    assert len(out["sigma"]) == 3 and all(np.isfinite(out[k]).all() for k in out)
    assert all(d > 0 for d in out["drift"])  # a random model leaves the trajectory
