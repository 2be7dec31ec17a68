"""`soar-fast demo`: pretrain (or reuse) a digits base, post-train it with SFT and with SOAR at
equal iterations and seeds, evaluate base / SFT / SOAR, and write a report folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from soar_fast.config import ConfigError, DemoConfig, EvalConfig, TrainConfig, get_recipe
from soar_fast.config.io import config_to_dict
from soar_fast.eval.evaluate import evaluate_model, load_run
from soar_fast.eval.grid import make_grid, save_png
from soar_fast.eval.report import plot_exposure, plot_losses, write_report
from soar_fast.train.logger import read_metrics
from soar_fast.train.trainer import Trainer

__all__ = ["base_cache_dir", "run_demo"]

log = logging.getLogger(__name__)
_MARKER = "demo.json"


def base_cache_dir(cfg: TrainConfig) -> Path:
    """~/.cache/soar_fast/digits-base-<hash of the pretraining config> (or under $SOAR_FAST_CACHE)."""
    d = config_to_dict(cfg)
    d["runtime"].pop("output_dir")
    d["runtime"].pop("num_threads")
    d["logging"].pop("progress_bar")
    key = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("SOAR_FAST_CACHE", Path.home() / ".cache" / "soar_fast"))
    return root / f"digits-base-{key}"


def _prepare_output(out: Path) -> None:
    """A fresh folder, or one a previous demo wrote (its marker file says so): never another run's."""
    if out.exists() and any(out.iterdir()):
        if not (out / _MARKER).exists():
            raise ConfigError(f"output_dir {str(out)!r} exists and is not a demo report folder; "
                              "pass a new --output_dir")
        for name in ("sft", "soar", "base-local"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(json.dumps({"status": "running", "started": time.time()}))


def _pretrain(dc: DemoConfig, out: Path) -> tuple[Path, dict[str, Any]]:
    cfg = get_recipe("digits-pretrain")
    if dc.pretrain_steps is not None:
        cfg.optim.max_train_steps = dc.pretrain_steps
    cfg.logging.progress_bar = dc.progress_bar
    base = Path(dc.base_dir) if dc.base_dir else base_cache_dir(cfg)
    cfg.runtime.num_threads = dc.num_threads
    if not dc.reuse_base:
        base = out / "base-local"
    summary = base / "train_summary.json"
    if dc.reuse_base and summary.exists() and (base / "final" / "transformer" / "config.json").exists():
        print(f"reusing the pretrained base in {base}")
        return base, {**json.loads(summary.read_text()), "reused": True}
    cfg.runtime.output_dir = str(base)
    cfg.checkpoint.resume_from_checkpoint = "latest"  # an interrupted pretraining continues
    print(f"pretraining the base ({cfg.optim.max_train_steps} steps) into {base}")
    r = Trainer(cfg).train()
    if r.interrupted:
        raise KeyboardInterrupt
    return base, {**dataclasses.asdict(r), "reused": False}


def _post_train(name: str, recipe: str, dc: DemoConfig, base: Path, out: Path) -> tuple[TrainConfig, dict[str, Any]]:
    cfg = get_recipe(recipe)
    cfg.model.pretrained_model_name_or_path = str(base / "final")
    cfg.runtime.output_dir = str(out / name)
    cfg.runtime.seed = dc.seed
    cfg.logging.progress_bar = dc.progress_bar
    cfg.runtime.num_threads = dc.num_threads
    if dc.post_train_steps is not None:
        cfg.optim.max_train_steps = dc.post_train_steps
    print(f"post-training with {name.upper()} ({cfg.optim.max_train_steps} steps, num_aux={cfg.soar.num_aux})")
    r = Trainer(cfg).train()
    if r.interrupted:
        raise KeyboardInterrupt
    return cfg, dataclasses.asdict(r)


def run_demo(dc: DemoConfig) -> Path:
    """The whole demo; returns the report path (also printed)."""
    t0 = time.perf_counter()
    if dc.num_threads:
        torch.set_num_threads(dc.num_threads)
    out = Path(dc.output_dir)
    _prepare_output(out)
    base, base_train = _pretrain(dc, out)
    sft_cfg, sft_train = _post_train("sft", "digits-sft", dc, base, out)
    soar_cfg, soar_train = _post_train("soar", "digits-soar", dc, base, out)

    ec = EvalConfig(run_dir=str(out), num_samples=dc.num_samples, num_inference_steps=dc.num_inference_steps,
                    guidance_scale=dc.guidance_scale, seed=dc.seed, exposure_samples=100, exposure_sigmas=10)
    results: dict[str, dict[str, Any]] = {}
    grids: dict[str, str] = {}
    for name, run in (("base", base), ("SFT", out / "sft"), ("SOAR", out / "soar")):
        print(f"evaluating {name} ({ec.num_samples} samples, {ec.num_inference_steps} Euler steps, CFG {ec.guidance_scale})")
        model, tcfg, ds = load_run(run)
        with torch.no_grad():
            res = evaluate_model(model, ds, ec, shift=tcfg.soar.shift, classifier_dir=out / "classifier")
        imgs = res.pop("_images")
        grids[name] = save_png(make_grid(imgs[: 4 * ds.num_classes], nrow=ds.num_classes),
                               out / f"grid_{name.lower()}.png").name
        results[name] = res
    train = {"base": base_train, "SFT": sft_train, "SOAR": soar_train}
    plots = {
        "loss curves": plot_losses({"SFT": read_metrics(out / "sft"), "SOAR": read_metrics(out / "soar")},
                                   out / "loss_curves.png").name,
        "exposure bias vs sigma": plot_exposure(results, out / "exposure_bias.png").name,
    }
    total = time.perf_counter() - t0
    setup = _setup_lines(base, base_train, sft_cfg, soar_cfg, ec)
    report = write_report(out, results=results, train=train, setup=setup, grids=grids, plots=plots,
                          total_wall_s=total)
    (out / "results.json").write_text(json.dumps({"results": results, "train": train, "total_wall_s": total},
                                                 indent=1, default=str))
    (out / _MARKER).write_text(json.dumps({"status": "done", "total_wall_s": total}))
    _print_table(results, train, total)
    print(f"report: {report.resolve()}")
    return report


def _setup_lines(base: Path, base_train: dict, sft: TrainConfig, soar: TrainConfig, ec: EvalConfig) -> dict[str, Any]:
    pre = get_recipe("digits-pretrain")
    o = soar.optim
    return {
        "data": "sklearn digits, 1,797 real 8x8 images, 10 classes, pixels as latents in [-1, 1]; "
                "class-conditional through fixed random prompt embeddings (empty prompt: its own)",
        "model": f"SD3Transformer2DModel preset 'digits' ({_params(base)} parameters)",
        "base": f"{base_train.get('step')} SFT steps from scratch, batch {pre.optim.train_batch_size}, "
                f"lr {pre.optim.learning_rate}, cond. dropout {pre.soar.cond_dropout}"
                f"{' (reused from cache)' if base_train.get('reused') else ''}; folder {base}",
        "post-training": f"{o.max_train_steps} steps each, batch {o.train_batch_size}, AdamW lr {o.learning_rate} "
                         f"constant, wd {o.adam_weight_decay}, clip {o.max_grad_norm}, seed {soar.runtime.seed} (equal)",
        "SFT": f"num_aux=0, cond. dropout {sft.soar.cond_dropout}",
        "SOAR": f"num_aux={soar.soar.num_aux}, rollout_steps={soar.soar.rollout_steps}, "
                f"guidance={soar.soar.guidance_scale}, lambda={soar.soar.lambda_aux}, "
                f"normalization={soar.soar.normalization}, cond. dropout {soar.soar.cond_dropout}",
        "evaluation": f"{ec.num_samples} samples per model, Euler {ec.num_inference_steps} steps, CFG {ec.guidance_scale}; "
                      f"exposure bias on {ec.exposure_samples} real digits, window {ec.exposure_window} sampler steps, "
                      f"{ec.exposure_sigmas} sigmas",
    }


def _params(base: Path) -> str:
    from safetensors import safe_open

    f = base / "final" / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(f), framework="pt") as h:
        n = sum(_prod(h.get_slice(k).get_shape()) for k in h.keys())
    return f"{n / 1e6:.2f}M"


def _prod(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _print_table(results: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]], total: float) -> None:
    print(f"\n{'model':6s} {'accuracy':>9s} {'Frechet':>9s} {'exp.bias':>9s} {'train s':>8s} {'steps/s':>8s}")
    for name, r in results.items():
        t = train.get(name, {})
        print(f"{name:6s} {r['accuracy']:9.3f} {r['frechet_distance']:9.3f} {r.get('exposure_bias', float('nan')):9.4f} "
              f"{t.get('wall_time_s', 0.0):8.1f} {t.get('steps_per_s', 0.0):8.2f}")
    print(f"real digits accuracy {next(iter(results.values()))['real_accuracy']:.3f}; demo wall time {total / 60:.1f} min")
