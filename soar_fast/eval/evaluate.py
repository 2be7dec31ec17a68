"""`soar-fast sample` and `soar-fast eval` on a run folder written by `soar-fast train`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soar_fast.config import ConfigError, EvalConfig, SampleConfig, TrainConfig, load_config_json
from soar_fast.data import DigitsDataset, build_dataset, load_digits_tensors
from soar_fast.eval.classifier import load_or_train_classifier
from soar_fast.eval.grid import make_grid, save_png
from soar_fast.eval.metrics import (
    conditional_accuracy,
    exposure_bias,
    frechet_distance,
    precision_recall_coverage,
)
from soar_fast.eval.sampler import generate_digits
from soar_fast.models import SD3VelocityFn

__all__ = ["evaluate_model", "evaluate_run", "exposure_metrics", "load_run", "sample_run"]


def load_run(run_dir: str | Path, weights: str = "final") -> tuple[torch.nn.Module, TrainConfig, Any]:
    """(transformer in eval mode, its TrainConfig, its dataset) of a finished run."""
    from diffusers import SD3Transformer2DModel

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"run folder {str(run)!r} has no config.json; pass --run_dir of a `soar-fast train` output_dir")
    cfg = load_config_json(run / "config.json")
    sub = "transformer_online" if weights == "online" else "transformer"
    folder = run / "final" / sub
    if not (folder / "config.json").is_file():
        fix = ("it exists for --use_ema runs (whose final/transformer holds the EMA weights)" if weights == "online"
               else "let `soar-fast train` finish (or resume it)")
        raise ConfigError(f"model folder {str(folder)!r} is missing; {fix}")
    model = SD3Transformer2DModel.from_pretrained(str(folder)).eval()
    mc = model.config
    dataset = build_dataset(cfg.data, joint_attention_dim=mc.joint_attention_dim,
                            pooled_projection_dim=mc.pooled_projection_dim)
    return model, cfg, dataset


def _need_digits(dataset: Any) -> DigitsDataset:
    if not isinstance(dataset, DigitsDataset):
        raise ConfigError("eval/sample need a class-conditional digits run (data.source='digits')")
    return dataset


def sample_run(cfg: SampleConfig) -> Path:
    """Draw `num_samples` images and write them as a grid PNG; returns its path."""
    model, tcfg, dataset = load_run(cfg.run_dir, cfg.weights)
    ds = _need_digits(dataset)
    if cfg.class_label is not None and cfg.class_label >= ds.num_classes:
        raise ConfigError(f"class_label={cfg.class_label} is invalid: choose 0..{ds.num_classes - 1}")
    labels = (torch.full((cfg.num_samples,), cfg.class_label) if cfg.class_label is not None
              else torch.arange(cfg.num_samples) % ds.num_classes)
    imgs = generate_digits(SD3VelocityFn(model), ds, labels, num_steps=cfg.num_inference_steps,
                           guidance_scale=cfg.guidance_scale, shift=tcfg.soar.shift, seed=cfg.seed)
    out = Path(cfg.output) if cfg.output else Path(cfg.run_dir) / "samples" / "sample.png"
    return save_png(make_grid(imgs, nrow=min(ds.num_classes, cfg.num_samples)), out)


def evaluate_model(model: torch.nn.Module, dataset: DigitsDataset, cfg: EvalConfig, *, shift: float,
                   classifier_dir: str | Path, generate=None) -> dict[str, Any]:
    """Accuracy, Frechet distance, precision / recall / coverage and exposure bias of `model` (or of
    `generate(labels) -> images`, which replaces the sampler: the hook tests use to score a perfect sampler)."""
    t0 = time.perf_counter()
    clf, meta = load_or_train_classifier(classifier_dir, resolution=dataset.sample_shape[-1])
    labels = torch.arange(cfg.num_samples) % dataset.num_classes
    vf = SD3VelocityFn(model) if model is not None else None
    if generate is None:
        imgs = generate_digits(vf, dataset, labels, num_steps=cfg.num_inference_steps,
                               guidance_scale=cfg.guidance_scale, shift=shift, seed=cfg.seed,
                               batch_size=cfg.batch_size)
    else:
        imgs = generate(labels)
    real_x, _ = load_digits_tensors(dataset.sample_shape[-1])
    with torch.no_grad():
        real_f, fake_f = clf.features(real_x).numpy(), clf.features(imgs).numpy()
        fd = frechet_distance(real_f, fake_f)
        # The floor: as many real digits as generated ones, against all of them (sampling noise of FD).
        pick = torch.randperm(len(real_x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.num_samples]
        fd_floor = frechet_distance(real_f, real_f[pick.numpy()])
    res: dict[str, Any] = {
        "accuracy": conditional_accuracy(clf, imgs, labels),
        "real_accuracy": meta["held_out_accuracy"],
        "frechet_distance": fd,
        "real_frechet_distance": fd_floor,
        "num_samples": cfg.num_samples,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        **precision_recall_coverage(real_f, fake_f),
    }
    if cfg.exposure_samples and vf is not None:
        res.update(exposure_metrics(model, dataset, cfg, shift=shift))
    res["eval_time_s"] = time.perf_counter() - t0
    res["_images"] = imgs
    return res


def exposure_metrics(model: torch.nn.Module, dataset: DigitsDataset, cfg: EvalConfig, *, shift: float) -> dict[str, Any]:
    """Exposure bias of `model` on `cfg.exposure_samples` real digits, its sampler at `cfg.guidance_scale`:
    the per-sigma lists (`exposure`) and their means."""
    rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + 1))[:cfg.exposure_samples]
    z0, cond, _ = dataset.batch(rows)
    eb = exposure_bias(SD3VelocityFn(model), z0, cond, dataset.uncond(), num_steps=cfg.num_inference_steps,
                       guidance_scale=cfg.guidance_scale, shift=shift, window=cfg.exposure_window,
                       num_sigmas=cfg.exposure_sigmas, seed=cfg.seed + 2)
    # The scalar: mean over sigmas of the gap in σ²-scaled (clean-image) units, so that no single
    # small sigma dominates; the per-sigma velocity errors are kept for the plot.
    gap = np.asarray(eb["x0_own"]) - np.asarray(eb["x0_true"])
    return dict(exposure=eb, exposure_bias=float(gap.mean()), x0_own_mean=float(np.mean(eb["x0_own"])),
                x0_true_mean=float(np.mean(eb["x0_true"])), drift_mean=float(np.mean(eb["drift"])))


def evaluate_run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate a run folder; writes `<run_dir>/eval.json` and `<run_dir>/samples/eval_grid.png`."""
    model, tcfg, dataset = load_run(cfg.run_dir, cfg.weights)
    ds = _need_digits(dataset)
    run = Path(cfg.run_dir)
    with torch.no_grad():
        res = evaluate_model(model, ds, cfg, shift=tcfg.soar.shift,
                             classifier_dir=cfg.classifier_dir or run / "classifier")
    imgs = res.pop("_images")
    n = min(len(imgs), 5 * ds.num_classes)
    res["grid"] = str(save_png(make_grid(imgs[:n], nrow=ds.num_classes), run / "samples" / "eval_grid.png"))
    (run / "eval.json").write_text(json.dumps(res, indent=1))
    return res
