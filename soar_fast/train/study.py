"""`soar-fast study` (and `soar-fast demo`, its one-seed case): SOAR vs SFT as an experiment.

One digits base is pretrained on a noisy "web" copy of the digits (label_noise, pixel_noise of the
digits-pretrain recipe) and post-trained on the curated real digits: SFT (M = 0) and SOAR at equal
iterations, for K seeds each (a seed fixes data order, the SOAR draws and the evaluation noise,
so SFT and SOAR of one seed are paired). Every final model (and the base) is evaluated at each
guidance scale, SFT and SOAR also every `eval_every` steps along training. Results go to
`rows.jsonl` as they are measured, one line per evaluation; an interrupted study is restarted
with the same command: finished runs and evaluations are kept, a run in progress continues from
its last checkpoint (one every `eval_every` steps, exact resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from soar_fast.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    StudyConfig,
    TrainConfig,
    get_recipe,
)
from soar_fast.config.io import config_to_dict
from soar_fast.data import build_dataset
from soar_fast.eval.evaluate import evaluate_model, exposure_metrics, load_run
from soar_fast.eval.grid import make_grid, save_png
from soar_fast.eval.report import write_study_report
from soar_fast.eval.study import rows_of_eval
from soar_fast.train.logger import read_metrics
from soar_fast.train.trainer import Trainer

__all__ = ["base_cache_dir", "run_demo", "run_study", "study_variants"]

log = logging.getLogger(__name__)
_MARKER = "study_state.json"


def base_cache_dir(cfg: TrainConfig) -> Path:
    """~/.cache/soar_fast/digits-base-<hash of the pretraining config> (or under $SOAR_FAST_CACHE)."""
    d = config_to_dict(cfg)
    d["runtime"].pop("output_dir")
    d["runtime"].pop("num_threads")
    d["logging"].pop("progress_bar")
    key = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("SOAR_FAST_CACHE", Path.home() / ".cache" / "soar_fast"))
    return root / f"digits-base-{key}"


def study_variants(sc: StudyConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(model name, recipe, SoarConfig overrides) of every post-training run of one seed: SFT, SOAR
    at the first M and lambda, then the ablations ('soar[M=4]', 'soar[lambda=0.5]')."""
    m0, l0 = sc.num_aux[0], sc.lambda_aux[0]
    out = [("sft", "digits-sft", {}), ("soar", "digits-soar", {"num_aux": m0, "lambda_aux": l0})]
    out += [(f"soar[M={m}]", "digits-soar", {"num_aux": m, "lambda_aux": l0}) for m in sc.num_aux[1:] if m != m0]
    out += [(f"soar[lambda={x:g}]", "digits-soar", {"num_aux": m0, "lambda_aux": x}) for x in sc.lambda_aux[1:] if x != l0]
    return out


def _folder(model: str, seed: int) -> str:
    return f"{model.replace('[', '-').replace(']', '').replace('=', '')}-seed{seed}"


class _State:
    """The study folder's resumable state: rows.jsonl (one evaluation a line, appended and flushed)
    and study_state.json (marker, configuration, wall time spent by earlier invocations)."""

    def __init__(self, out: Path, sc: StudyConfig):
        self.out, self.rows_path = out, out / "rows.jsonl"
        marker = out / _MARKER
        if out.is_file():
            raise ConfigError(f"output_dir {str(out)!r} is a file; pass a folder with --output_dir")
        if out.exists() and any(out.iterdir()) and not marker.exists():
            raise ConfigError(f"output_dir {str(out)!r} exists and is not a study or demo report folder; "
                              "pass a new --output_dir")
        out.mkdir(parents=True, exist_ok=True)
        prev = json.loads(marker.read_text()) if marker.exists() else {}
        me = dataclasses.asdict(sc)
        keep = ("progress_bar", "num_threads", "report_only")
        same = not prev or ({k: v for k, v in prev.get("config", {}).items() if k not in keep} ==
                            {k: v for k, v in json.loads(json.dumps(me)).items() if k not in keep})
        if not same and (sc.report_only or prev.get("status") != "done"):  # never throw measured rows away
            raise ConfigError(f"output_dir {str(out)!r} holds an unfinished study (or one to report on) of another "
                              "configuration; re-run it with its own flags to resume it, or pass a new --output_dir")
        done = prev.get("status") == "done" and not sc.report_only
        self.spent = float(prev.get("elapsed_s", 0.0)) if not done else 0.0
        if done:  # a finished study run again: measure it again from scratch
            for p in (self.rows_path, out / "runs"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.resumed = bool(prev) and not done
        self.units: dict[str, list[dict]] = {}
        self.train: dict[str, dict[str, Any]] = dict(prev.get("train", {})) if self.resumed else {}
        if self.rows_path.exists():
            for line in self.rows_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill: that evaluation runs again
                    continue
                self.units[rec["unit"]] = rec["rows"]
        self.config, self.t0 = me, time.perf_counter()
        self.status = prev.get("status", "running")
        self.command = prev.get("command") if sc.report_only else "soar-fast " + " ".join(sys.argv[1:])
        self.commit = prev.get("commit") if sc.report_only else os.environ.get("SOAR_FAST_COMMIT")
        if not sc.report_only:
            self.write("running")

    @staticmethod
    def unit(model: str, seed: int, step: int, scale: float) -> str:
        return f"{model}/seed{seed}/step{step}/cfg{scale:g}"

    def add(self, unit: str, rows: list[dict]) -> None:
        with self.rows_path.open("a") as f:
            f.write(json.dumps({"unit": unit, "rows": rows}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.units[unit] = rows

    def elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.t0

    def write(self, status: str) -> None:
        tmp = self.out / (_MARKER + ".tmp")
        tmp.write_text(json.dumps({"status": status, "elapsed_s": self.elapsed(), "config": self.config,
                                   "command": self.command, "commit": self.commit,
                                   "train": self.train}, indent=1))
        tmp.replace(self.out / _MARKER)

    def all_rows(self) -> list[dict]:
        return [r for rows in self.units.values() for r in rows]


def _pretrain(sc: StudyConfig, out: Path) -> tuple[Path, dict[str, Any]]:
    cfg = get_recipe("digits-pretrain")
    if sc.pretrain_steps is not None:
        cfg.optim.max_train_steps = sc.pretrain_steps
    cfg.logging.progress_bar = sc.progress_bar
    base = Path(sc.base_dir) if sc.base_dir else base_cache_dir(cfg)
    cfg.runtime.num_threads = sc.num_threads
    if not sc.reuse_base:
        base = out / "base-local"
        if not (base / "final").exists():
            shutil.rmtree(base, ignore_errors=True)
    summary = base / "train_summary.json"
    if summary.exists() and (base / "final" / "transformer" / "config.json").exists():
        print(f"reusing the pretrained base in {base}")
        return base, {**json.loads(summary.read_text()), "reused": True}
    cfg.runtime.output_dir = str(base)
    cfg.checkpoint.resume_from_checkpoint = "latest"  # an interrupted pretraining continues
    print(f"pretraining the base ({cfg.optim.max_train_steps} steps on the noisy 'web' digits) into {base}")
    r = Trainer(cfg).train()
    if r.interrupted:
        raise KeyboardInterrupt
    return base, {**dataclasses.asdict(r), "reused": False}


class _Evaluator:
    """Evaluates a model (in memory) at one guidance scale on the curated digits and records its rows."""

    def __init__(self, sc: StudyConfig, state: _State, shift: float, post_steps: int):
        self.sc, self.state, self.shift, self.post_steps = sc, state, shift, post_steps
        self.ds: Any = None
        self.clf_dir = state.out / "classifier"
        self.grid_scales = sorted({min(sc.guidance_scales), max(sc.guidance_scales)})
        self.grids: dict[str, str] = {}
        self.seconds = 0.0

    def dataset(self, model: torch.nn.Module, like: TrainConfig) -> Any:
        """The curated digits (no label or pixel noise) with the prompts every run shares."""
        if self.ds is None:
            mc, d = model.config, like.data
            self.ds = build_dataset(DataConfig(source="digits", resolution=d.resolution, prompt_tokens=d.prompt_tokens,
                                               embedding_seed=d.embedding_seed), joint_attention_dim=mc.joint_attention_dim,
                                    pooled_projection_dim=mc.pooled_projection_dim)
        return self.ds

    def __call__(self, model: torch.nn.Module, like: TrainConfig, *, name: str, seed: int, step: int,
                 scale: float, exposure: bool, samples: bool = True) -> None:
        """One evaluation unit (skipped when done): the sample metrics at `scale` (`samples`) and/or
        the exposure-bias probe with the sampler at `scale` (`exposure`)."""
        unit = self.state.unit(name, seed, step, scale) + ("" if samples else "/exposure")
        if unit in self.state.units:
            return
        t0 = time.perf_counter()
        ds, sc = self.dataset(model, like), self.sc
        ec = EvalConfig(run_dir=str(self.state.out), num_samples=sc.num_samples,
                        num_inference_steps=sc.num_inference_steps, guidance_scale=scale, seed=seed,
                        exposure_samples=sc.exposure_samples if exposure else 0, exposure_sigmas=sc.exposure_sigmas)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            res = (evaluate_model(model, ds, ec, shift=self.shift, classifier_dir=self.clf_dir) if samples
                   else exposure_metrics(model, ds, ec, shift=self.shift))
        model.train(was_training)
        rows = rows_of_eval(res, model=name, seed=seed, step=step, guidance_scale=scale)
        if samples:
            imgs = res.pop("_images")
            if seed == sc.seed and step == self._final_step(name) and scale in self.grid_scales:
                g = save_png(make_grid(imgs[: 4 * ds.num_classes], nrow=ds.num_classes),
                             self.state.out / f"grid_{_folder(name, seed).rsplit('-seed', 1)[0]}_cfg{scale:g}.png")
                self.grids[f"{name} CFG {scale:g}"] = g.name
            rows += [{"model": "real", "seed": seed, "guidance_scale": scale, "step": step, "metric": m,
                      "value": float(res[k])} for m, k in (("accuracy", "real_accuracy"),
                                                           ("frechet_distance", "real_frechet_distance"))]
        self.seconds += time.perf_counter() - t0
        self.state.add(unit, rows)
        got = [f"{k.replace('_', ' ')} {res[k]:.3f}" for k in ("accuracy", "frechet_distance", "precision", "recall",
                                                               "exposure_bias") if k in res]
        print(f"  evaluated {name} seed {seed} step {step} CFG {scale:g}: {', '.join(got)} "
              f"({time.perf_counter() - t0:.0f} s; study {self.state.elapsed() / 60:.1f} min)", flush=True)

    def final(self, model: torch.nn.Module, like: TrainConfig, *, name: str, seed: int, step: int) -> None:
        ex = self.sc.exposure_guidance_scale if self.sc.exposure_samples else None
        for g in self.sc.guidance_scales:
            self(model, like, name=name, seed=seed, step=step, scale=g, exposure=g == ex)
        if ex is not None and ex not in self.sc.guidance_scales:
            self(model, like, name=name, seed=seed, step=step, scale=ex, exposure=True, samples=False)

    def _final_step(self, name: str) -> int:
        return 0 if name == "base" else self.post_steps


def _post_train(sc: StudyConfig, state: _State, ev: _Evaluator, base: Path, name: str, recipe: str,
                over: dict[str, Any], seed: int) -> None:
    cfg = get_recipe(recipe)
    for k, v in over.items():
        setattr(cfg.soar, k, v)
    cfg.model.pretrained_model_name_or_path = str(base / "final")
    run = state.out / "runs" / _folder(name, seed)
    cfg.runtime.output_dir, cfg.runtime.seed, cfg.runtime.num_threads = str(run), seed, sc.num_threads
    cfg.logging.progress_bar = sc.progress_bar
    if sc.post_train_steps is not None:
        cfg.optim.max_train_steps = sc.post_train_steps
    steps = cfg.optim.max_train_steps
    ckpt_every = sc.eval_every or max(steps // 3, 1)
    cfg.checkpoint.checkpointing_steps, cfg.checkpoint.checkpoints_total_limit = ckpt_every, 1
    cfg.checkpoint.resume_from_checkpoint, cfg.checkpoint.final_checkpoint = "latest", False
    key = f"{name}/seed{seed}"
    if not ((run / "train_summary.json").exists() and (run / "final" / "transformer" / "config.json").exists()):
        print(f"study: post-training {name} seed {seed} ({steps} steps, num_aux={cfg.soar.num_aux}, "
              f"lambda={cfg.soar.lambda_aux}; study {state.elapsed() / 60:.1f} min)", flush=True)
        spent = ev.seconds

        def on_step(tr: Trainer) -> None:
            if sc.eval_every and tr.step % sc.eval_every == 0 and tr.step < steps:
                for g in sc.curve_guidance_scales:
                    ev(tr.model, cfg, name=name, seed=seed, step=tr.step, scale=g, exposure=False)

        r = Trainer(cfg).train(on_step=on_step)
        if r.interrupted:
            raise KeyboardInterrupt
        train_s = r.wall_time_s - (ev.seconds - spent)
        state.train[key] = {"step": r.step, "train_s": train_s, "steps_per_s": r.steps_per_s * r.wall_time_s / max(train_s, 1e-9)}
        state.write("running")
    model, tcfg, _ = load_run(run)
    ev.final(model, tcfg, name=name, seed=seed, step=steps)


def run_study(sc: StudyConfig, *, title: str = "study") -> Path:
    """The whole study (or demo); returns the report path (also printed)."""
    if sc.num_threads:
        torch.set_num_threads(sc.num_threads)
    out = Path(sc.output_dir)
    state = _State(out, sc)
    if sc.report_only:
        return _report_again(sc, state, title)
    if state.resumed:
        print(f"resuming the {title} in {out}: {len(state.units)} evaluations already done")
    base, base_train = _pretrain(sc, out)
    state.train["base"] = {"step": base_train.get("step"), "train_s": base_train.get("wall_time_s"),
                           "steps_per_s": base_train.get("steps_per_s"), "reused": base_train.get("reused")}
    model, bcfg, _ = load_run(base)
    post = get_recipe("digits-sft").optim.max_train_steps if sc.post_train_steps is None else sc.post_train_steps
    ev = _Evaluator(sc, state, shift=bcfg.soar.shift, post_steps=post)
    seeds = list(range(sc.seed, sc.seed + sc.num_seeds))
    for seed in seeds:
        ev.final(model, bcfg, name="base", seed=seed, step=0)
    for seed in seeds:
        for name, recipe, over in study_variants(sc):
            _post_train(sc, state, ev, base, name, recipe, over, seed)
    state.write("reporting")
    report = write_study_report(out, rows=state.all_rows(), train=state.train, config=state.config,
                                setup=_setup(sc, base_train), grids=ev.grids, seeds=seeds,
                                losses={n: read_metrics(out / "runs" / _folder(n, sc.seed)) for n, _, _ in study_variants(sc)},
                                wall_s=state.elapsed(), title=title, command=state.command, commit=state.commit)
    state.write("done")
    print(f"report: {report.resolve()}")
    return report


def _report_again(sc: StudyConfig, state: _State, title: str) -> Path:
    """--report_only: report.md, study.json and the plots again from the rows measured so far."""
    out = state.out
    if not state.units:
        raise ConfigError(f"nothing measured in {str(out)!r} yet; run the {title} without --report_only")
    grids = {}
    for g in sorted(out.glob("grid_*_cfg*.png")):
        name, scale = g.stem.removeprefix("grid_").rsplit("_cfg", 1)
        grids[f"{name} CFG {scale}"] = g.name
    seeds = sorted({r["seed"] for r in state.all_rows()})
    report = write_study_report(out, rows=state.all_rows(), train=state.train, config=state.config,
                                setup=_setup(sc, state.train.get("base", {})), grids=grids, seeds=seeds,
                                losses={n: read_metrics(out / "runs" / _folder(n, sc.seed)) for n, _, _ in study_variants(sc)},
                                wall_s=state.spent, title=title, command=state.command, commit=state.commit)
    print(f"report ({state.status}, from {len(state.units)} evaluations): {report.resolve()}")
    return report


def run_demo(dc: StudyConfig) -> Path:
    """`soar-fast demo`: the study with the demo's defaults (one seed, two scales, final models only)."""
    return run_study(dc, title="demo")


def _setup(sc: StudyConfig, base_train: dict[str, Any]) -> dict[str, str]:
    pre, soar = get_recipe("digits-pretrain"), get_recipe("digits-soar")
    o = soar.optim
    steps = sc.post_train_steps or o.max_train_steps
    return {
        "data": "sklearn digits, 1,797 real 8x8 images, 10 classes, pixels as latents in [-1, 1]; class-conditional "
                "through fixed random prompt embeddings (the empty prompt has its own)",
        "base (the 'web' model)": f"{base_train.get('step')} steps from scratch on a noisy copy of the digits: "
                                  f"{pre.data.label_noise:.0%} of labels replaced by another class, Gaussian pixel "
                                  f"noise of std {pre.data.pixel_noise} (fixed); batch {pre.optim.train_batch_size}, "
                                  f"lr {pre.optim.learning_rate}, cond. dropout {pre.soar.cond_dropout}"
                                  f"{' (reused from cache)' if base_train.get('reused') else ''}",
        "post-training (the curated data)": f"the clean real digits, {steps} steps each, batch {o.train_batch_size}, AdamW lr "
                                            f"{o.learning_rate} constant, wd {o.adam_weight_decay}, clip {o.max_grad_norm}; "
                                            "SFT and SOAR of one seed share data order and evaluation noise",
        "SOAR": f"num_aux={sc.num_aux[0]}, rollout_steps={soar.soar.rollout_steps}, rollout CFG {soar.soar.guidance_scale}, "
                f"lambda={sc.lambda_aux[0]}, normalization={soar.soar.normalization}",
        "evaluation": f"{sc.num_samples} samples per model and scale, Euler {sc.num_inference_steps} steps, CFG "
                      f"{', '.join(f'{g:g}' for g in sc.guidance_scales)}; along training every {sc.eval_every or '-'} "
                      f"steps at CFG {', '.join(f'{g:g}' for g in sc.curve_guidance_scales)}; exposure bias on "
                      f"{sc.exposure_samples} real digits at {sc.exposure_sigmas} sigmas, sampler CFG {sc.exposure_guidance_scale:g}",
        "seeds": f"{sc.num_seeds} ({sc.seed}..{sc.seed + sc.num_seeds - 1})",
    }
