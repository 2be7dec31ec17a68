"""The same path for Flux: cache -> SOAR steps (full, LoRA) -> export -> FluxPipeline -> sample."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from soar_fast import SoarConfig, soar_loss
from soar_fast.config.sd35 import NotAPipelineError
from soar_fast.data.cache import CacheConfig, run_cache
from soar_fast.data.images import ImageFolderConfig
from soar_fast.data.latents import LatentsDataset
from soar_fast.data.loader import BatchStream, ResumableSampler
from soar_fast.data.shards import load_empty_prompt
from soar_fast.models.flux import FluxVelocityFn
from soar_fast.models.lora import LoraSettings, apply_lora, save_lora_weights, trainable_parameters
from soar_fast.models.pipeline import (
    export_transformer,
    load_pipeline,
    load_sd3_transformer,
    load_transformer,
)
from soar_fast.models.sampling import SampleConfig, run_sample
from soar_fast.models.spec import get_family


@pytest.fixture(scope="module")
def flux_cache(tiny_flux_dir, caption_folder, tmp_path_factory):
    cfg = CacheConfig(pretrained_model_name_or_path=str(tiny_flux_dir),
                      data=ImageFolderConfig(root=str(caption_folder), resolution=32),
                      output_dir=str(tmp_path_factory.mktemp("flux_cache")), max_sequence_length=16,
                      progress=False, store_dtype="float32")
    return cfg, run_cache(cfg)


def _steps(transformer, cache_dir, steps=2, lr=1e-3):
    ds = LatentsDataset(cache_dir)
    stream = BatchStream(ds, ResumableSampler(len(ds), 2, seed=0, groups=ds.groups))
    uncond = load_empty_prompt(cache_dir)
    params = trainable_parameters(transformer)
    opt = torch.optim.AdamW(params, lr=lr)
    vf = FluxVelocityFn(transformer, guidance=3.5)
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    for _, (lat, (pe, pooled), _) in itertools.islice(stream, steps):
        out = soar_loss(vf, lat, (pe, pooled), uncond, SoarConfig(num_aux=2), gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert np.isfinite(out.metrics["loss"]) and out.metrics["aux_loss"] > 0
    assert max((p - b).abs().max().item() for p, b in zip(params, before, strict=True)) > 1e-4


def _probe(transformer):
    with torch.no_grad():
        return FluxVelocityFn(transformer, guidance=3.5)(
            torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.6]),
            (torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2)),
             torch.randn(1, 32, generator=torch.Generator().manual_seed(3))))


def test_flux_cache_contents(flux_cache, tiny_flux_dir):
    from diffusers import FluxPipeline

    cfg, res = flux_cache
    assert res.num_samples == 6 and res.skipped == []
    lat, (pe, pooled), _ = LatentsDataset(cfg.output_dir).batch(torch.arange(3))
    assert lat.shape == (3, 4, 16, 16) and pe.shape == (3, 16, 32) and pooled.shape == (3, 32)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    with torch.no_grad():
        e_pe, e_pooled, _ = pipe.encode_prompt("", None, max_sequence_length=16)
    u_pe, u_pooled = load_empty_prompt(cfg.output_dir)
    torch.testing.assert_close(u_pe, e_pe[0])
    torch.testing.assert_close(u_pooled, e_pooled[0])
    with pytest.raises(NotAPipelineError, match="holds a FluxPipeline"):
        load_sd3_transformer(tiny_flux_dir)


def test_flux_full_and_lora_round_trip(flux_cache, tiny_flux_dir, tmp_path):
    from diffusers import FluxPipeline

    cfg, _ = flux_cache
    t = load_transformer(tiny_flux_dir)
    _steps(t, cfg.output_dir)
    out = export_transformer(t, tmp_path / "flux_full", base=tiny_flux_dir)
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(_probe(pipe.transformer), _probe(t))
    res = run_sample(SampleConfig(pretrained_model_name_or_path=str(out), output_dir=str(tmp_path / "s"),
                                  prompts=["a red cat", "a blue sky"], num_inference_steps=4,
                                  guidance_scale=3.5, max_sequence_length=16, height=32, width=32))
    assert len(res.images) == 2 and res.images[0].size == (32, 32) and res.grid_path.is_file()

    lt = apply_lora(load_transformer(tiny_flux_dir), LoraSettings(rank=4, lora_alpha=2.0))
    _steps(lt, cfg.output_dir, lr=1e-2)
    save_lora_weights(lt, tmp_path / "flux_lora")
    lp = load_pipeline(tiny_flux_dir, lora_path=tmp_path / "flux_lora")
    torch.testing.assert_close(_probe(lp.transformer), _probe(lt), atol=1e-5, rtol=1e-5)
    assert (_probe(lt) - _probe(load_transformer(tiny_flux_dir))).abs().max() > 1e-4  # the LoRA matters


def test_soar_fast_train_trains_a_flux_folder_cache_and_preset(flux_cache, tiny_flux_dir, tmp_path):
    """The trainer takes Flux the way it takes SD3: a pipeline folder + its latent cache (the
    family read from config.json), LoRA included, and a random-init preset on synthetic latents."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from soar_fast.cli import main

    cfg, _ = flux_cache
    common = ["train", "--recipe", "tiny", "--report_to", "none", "--runtime.step", "fast", "--max_train_steps", "2",
              "--checkpointing_steps", "0", "--train_batch_size", "2"]
    folder = ["--pretrained_model_name_or_path", str(tiny_flux_dir), "--data.source", "latents",
              "--data.data_dir", cfg.output_dir]
    assert main([*common, *folder, "--output_dir", str(tmp_path / "full")]) == 0
    trained = FluxTransformer2DModel.from_pretrained(tmp_path / "full" / "final" / "transformer")
    base = load_transformer(tiny_flux_dir)
    assert (_probe(trained) - _probe(base)).abs().max() > 1e-5
    assert main([*common, *folder, "--model.lora_rank", "4", "--output_dir", str(tmp_path / "lora")]) == 0
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora" / "final")
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    # a preset on synthetic latents: the source takes its channels (in_channels / 4 = 4) and text dims
    # from the model; the export loads as the family's class, with the preset's architecture, trained
    preset = tmp_path / "preset"
    assert main(["train", "--model.family", "flux", "--model.preset", "tiny", "--data.source", "synthetic",
                 "--data.num_samples", "8", "--data.prompt_tokens", "5", "--soar.num_aux", "2", "--runtime.step", "fast",
                 "--max_train_steps", "2", "--train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
                 "--checkpointing_steps", "0", "--logging.logging_steps", "1", "--logging.no_progress_bar",
                 "--output_dir", str(preset)]) == 0
    exported = FluxTransformer2DModel.from_pretrained(preset / "final" / "transformer")
    want = get_family("flux").presets["tiny"]
    assert {k: exported.config[k] for k in ("in_channels", "num_layers", "num_single_layers", "joint_attention_dim")} \
        == {k: want[k] for k in ("in_channels", "num_layers", "num_single_layers", "joint_attention_dim")}
    assert (_probe(exported) - _probe(get_family("flux").build("tiny", seed=0))).abs().max() > 1e-5
    rows = [json.loads(r) for r in (preset / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) and r["train/aux_loss"] > 0 for r in rows)


def test_a_head_dim_that_does_not_fit_flux_rope_is_one_line(tmp_path, capsys):
    """The tiny recipe's head dim (8) with the Flux preset (rotary axes 4+4+8 = 16): one line, the fix."""
    from soar_fast.cli import main

    assert main(["train", "--recipe", "tiny", "--model.family", "flux", "--model.preset", "tiny",
                 "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model.attention_head_dim 16" in err[0]


def test_a_cache_of_another_text_encoder_is_one_line(flux_cache, tmp_path, capsys):
    """The Flux cache (pooled CLIP width 32) under the SD3 tiny preset (pooled 64): one line."""
    from soar_fast.cli import main

    cfg, _ = flux_cache
    before = {p.name: p.stat().st_mtime_ns for p in Path(cfg.output_dir).iterdir()}
    assert main(["train", "--model.preset", "tiny", "--data.source", "latents", "--data.data_dir", cfg.output_dir,
                 "--report_to", "none", "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text embeddings" in err[0] and "cache the data with this model's pipeline" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.output_dir).iterdir()} == before
