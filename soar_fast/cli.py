"""`soar-fast`: cache | train | sample | eval | demo | study | parity | recipes. Thin: parse -> build -> run.

    soar-fast cache --pretrained_model_name_or_path /models/sd35m --data.root /data/pets --output_dir /cache/pets
    soar-fast train --recipe sd35m-soar --pretrained_model_name_or_path /models/sd35m --data.data_dir /cache/pets
    soar-fast sample --pipeline /models/sd35m --transformer runs/sd35m-soar/final/transformer --prompts p.txt --output_dir s
    soar-fast train --recipe digits-soar --learning_rate 1e-4 --output_dir runs/x
    soar-fast train --config my.toml --max_train_steps 500 --resume
    soar-fast demo; soar-fast study --num_seeds 3

Bad input exits with status 2 and one line `soar-fast: error: ...` naming the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

USAGE = """usage: soar-fast {cache,train,plan,sample,eval,demo,study,parity,recipes} [flags]

  cache    encode an image-caption folder with a local pipeline (SD3, FLUX.1/2, Qwen-Image, Z-Image) into a latent cache
  train    train with SFT or SOAR from a recipe and/or a TOML/YAML file plus --flags
  plan     the peak GPU memory per rank of `train`'s flags, predicted on a CPU (parts, phases);
           `--gpu_memory 24` (GiB) or `auto` adds the cheapest options that make it fit
  sample   write a grid of samples of a trained run
           (`sample --pipeline <folder> [--transformer DIR] [--lora PATH] --prompts FILE`: the family's pipeline)
  eval     accuracy, Frechet distance and exposure bias of a trained digits run
           (`eval --prompts --help`: a prompt file through an SD3 pipeline, external scorers)
  demo     pretrain a digits base, post-train it with SFT and SOAR, evaluate, write a report
  study    the demo over seeds and guidance scales: mean ± std, paired SOAR − SFT, report + JSON (resumable)
  parity   the same SOAR step through every fast variant vs the eager reference (exit 1 on a failure)
  recipes  list the recipes

`soar-fast <command> --help` explains every flag. An error you can fix is one line
(`soar-fast: error: ...`, exit 2); `--debug` (or SOAR_FAST_DEBUG=1) shows its traceback."""

TRAIN_EXTRA = """Before the flags below, `train` takes:
  --recipe NAME   start from a recipe ({recipes}); default: the TrainConfig defaults
  --config FILE   apply a .toml/.yaml/.json file of sections on top of the recipe
  --resume        shorthand for --resume_from_checkpoint latest

Flags then override single fields (`--section.field value`; diffusers names such as
--learning_rate, --train_batch_size, --max_train_steps, --output_dir work without the section)."""


class UsageError(Exception):
    """Bad command-line input; the message is one line."""


def _fail(msg: str, code: int = 2) -> int:
    print(f"soar-fast: error: {msg}", file=sys.stderr)
    return code


def _condense(text: str) -> str:
    """tyro's boxed error as one line: the title, the message, and the first suggestion."""
    lines = []
    for raw in text.splitlines():
        s = raw.strip().strip("│╭╮╰╯─").strip()
        if s:
            lines.append(s)
    msg, suggestion, title = [], "", ""
    for i, s in enumerate(lines):
        if set(s) <= set("-─ "):
            if msg:
                rest = lines[i + 1:]
                if rest and rest[0].startswith("Perhaps you meant"):
                    suggestion = rest[1].split()[0].rstrip(",") if len(rest) > 1 else ""
                break
            continue
        if s.startswith(("For full helptext", "Argument helptext")):
            break
        if not title:
            title = s
        else:
            msg.append(s)
    out = " ".join(msg) or title
    if re.match(r"^Error parsing [\w.]+: ", out):  # a ConfigError from __post_init__: keep our message
        out = out.split(": ", 1)[1]
    if suggestion:
        out += f"; did you mean {suggestion}?"
    return out


def _tyro_parse(cls: type, args: Sequence[str], prog: str, description: str, default: Any = None) -> Any:
    """tyro.cli with its console output captured: --help passes through, errors become UsageError."""
    import tyro

    buf = io.StringIO()
    kwargs: dict[str, Any] = {"prog": prog, "description": description, "args": list(args),
                              "use_underscores": True}
    if default is not None:
        kwargs["default"] = default
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            return tyro.cli(cls, **kwargs)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stdout.write(buf.getvalue())
            raise
        msg = _condense(buf.getvalue())
        if msg.startswith("Unrecognized options") and "did you mean" not in msg:
            msg += _suggest(msg, cls, default)
        raise UsageError(msg + f" (see `{prog} --help`)") from None


def _suggest(msg: str, cls: type, default: Any) -> str:
    """'; did you mean --x?' for the first unknown flag close to a real one (read from --help)."""
    import difflib

    import tyro

    buf = io.StringIO()
    kwargs: dict[str, Any] = {"args": ["--help"], "use_underscores": True}
    if default is not None:
        kwargs["default"] = default
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            tyro.cli(cls, **kwargs)
    except SystemExit:
        pass
    known = sorted(set(re.findall(r"--[A-Za-z][\w.]*", buf.getvalue())))
    for word in (w.strip(",") for w in msg.split() if w.startswith("--")):
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
        if close:
            return f"; did you mean {close[0]}?"
    return ""


def _parse_train(argv: Sequence[str], require_paths: bool = True):
    from soar_fast.config import TrainConfig, get_recipe, load_config_file, recipe_names

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config")
    pre.add_argument("--resume", action="store_true")
    known, rest = pre.parse_known_args(list(argv))
    cfg = get_recipe(known.recipe) if known.recipe else TrainConfig()
    if known.config:
        cfg = load_config_file(known.config, base=cfg)
    if known.resume:
        rest = [*rest, "--resume_from_checkpoint", "latest"]
    desc = "Train with SFT (--soar.num_aux 0) or SOAR.\n\n" + TRAIN_EXTRA.format(recipes=", ".join(recipe_names()))
    from soar_fast.config.argv import normalize_train_argv

    cfg = _tyro_parse(TrainConfig, normalize_train_argv(rest, TrainConfig), "soar-fast train", desc, default=cfg)
    from soar_fast.config.recipes import check_recipe_requirements

    if require_paths:
        check_recipe_requirements(cfg)
    return cfg


def _cmd_train(argv: Sequence[str]) -> int:
    from soar_fast.train import Trainer

    cfg = _parse_train(argv)
    result = Trainer(cfg).train()
    out = cfg.runtime.output_dir
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if result.interrupted:
        print(f"interrupted at step {result.step}: checkpoint {result.last_checkpoint}; "
              f"continue with `soar-fast train ... --output_dir {out} --resume`")
        return 0
    print(f"done: {result.step} steps in {result.wall_time_s:.1f} s ({result.steps_per_s:.2f} steps/s), "
          f"{result.nan_skipped} skipped; run folder {out}")
    return 0


def _cmd_plan(argv: Sequence[str]) -> int:
    """`soar-fast plan [train flags] [--gpu_memory GiB|auto] [--world_size N]`: one table."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--gpu_memory")
    pre.add_argument("--world_size")
    known, rest = pre.parse_known_args(list(argv))
    if "-h" in rest or "--help" in rest:
        print("soar-fast plan: the flags of `soar-fast train` (below) plus --gpu_memory GiB|auto (choose options "
              "until the step fits) and --world_size N (FSDP2 ranks; default $WORLD_SIZE or 1)\n")
    from soar_fast.train.plan import plan_target, print_plan

    world, gpu = plan_target(known.world_size, known.gpu_memory)
    print_plan(_parse_train(rest, require_paths=False), world, gpu)
    return 0


# `sample --pipeline ...` short flags -> the fields of soar_fast.models.sampling.SampleConfig.
_PIPELINE_SAMPLE_ALIASES = {"--pipeline": "--pretrained_model_name_or_path", "--transformer": "--transformer_path",
                            "--lora": "--lora_path"}


def _pipeline_sample_args(argv: Sequence[str]) -> list[str]:
    """Rename the short flags; `--prompts FILE` (one existing file, or a .txt/.jsonl name) is `--prompt_file`."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        flag, eq, val = a.partition("=")
        if flag in _PIPELINE_SAMPLE_ALIASES:
            out.append(_PIPELINE_SAMPLE_ALIASES[flag] + eq + val)
        elif flag == "--prompts":
            vals = [val] if eq else []
            j = i + 1
            while not eq and j < len(args) and not args[j].startswith("--"):
                vals.append(args[j])
                j += 1
            if len(vals) == 1 and (Path(vals[0]).is_file() or vals[0].endswith((".txt", ".jsonl"))):
                out += ["--prompt_file", vals[0]]
            else:
                out += ["--prompts", *vals]
            i = j if not eq else i + 1
            continue
        else:
            out.append(a)
        i += 1
    return out


def _cmd_sample_pipeline(argv: Sequence[str]) -> int:
    from soar_fast.config.sd35 import NotAPipelineError
    from soar_fast.models.sampling import SampleConfig, run_sample

    desc = ("Sample a prompt file through a local SD3 (or Flux) pipeline folder: --pipeline <folder> "
            "[--transformer <final/transformer or export folder>] [--lora <final folder or .safetensors>] "
            "--prompts prompts.txt --output_dir <folder>. Writes NNNNN_K.png, grid.png, prompts.json.")
    cfg = _tyro_parse(SampleConfig, _pipeline_sample_args(argv), "soar-fast sample --pipeline", desc)
    for name, p in (("--transformer", cfg.transformer_path), ("--lora", cfg.lora_path),
                    ("--prompts", cfg.prompt_file)):
        if p and not Path(p).exists():
            raise UsageError(f"{name} {p} does not exist")
    try:
        res = run_sample(cfg)
    except (NotAPipelineError, FileNotFoundError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    print(f"{len(res.images)} images and grid {res.grid_path} written to {cfg.output_dir}")
    return 0


def _cmd_sample(argv: Sequence[str]) -> int:
    if any(a.split("=")[0] in ("--pipeline", "--pretrained_model_name_or_path") for a in argv):
        return _cmd_sample_pipeline(argv)
    from soar_fast.config import SampleConfig
    from soar_fast.eval.evaluate import sample_run

    cfg = _tyro_parse(SampleConfig, argv, "soar-fast sample", SampleConfig.__doc__ or "")
    print(f"samples written to {sample_run(cfg)}")
    return 0


def _cmd_eval_prompts(argv: Sequence[str]) -> int:
    from soar_fast.eval.external import ExternalEvalConfig, run_external_eval

    cfg = _tyro_parse(ExternalEvalConfig, argv, "soar-fast eval --prompts", ExternalEvalConfig.__doc__ or "")
    res = run_external_eval(cfg)
    for name, s in res["scores"].items():
        print(f"{name}: {s['mean']:.4f}")
    print(f"written to {cfg.output_dir}/results.json")
    return 0


def _cmd_eval(argv: Sequence[str]) -> int:
    from soar_fast.config import EvalConfig
    from soar_fast.eval.evaluate import evaluate_run

    if "--prompts" in argv or any(a.startswith("--prompt_file") for a in argv):  # external scorers (eval/external.py)
        return _cmd_eval_prompts([a for a in argv if a != "--prompts"])
    cfg = _tyro_parse(EvalConfig, argv, "soar-fast eval", EvalConfig.__doc__ or "")
    res = evaluate_run(cfg)
    keys = ("accuracy", "frechet_distance", "precision", "recall", "coverage", "exposure_bias")
    print("  ".join(f"{k.replace('_', ' ')} {res[k]:.4f}" for k in keys if k in res)
          + f"  (real digits accuracy {res['real_accuracy']:.3f}); written to {cfg.run_dir}/eval.json")
    return 0


def _cmd_cache(argv: Sequence[str]) -> int:
    from soar_fast.config.sd35 import NotAPipelineError
    from soar_fast.data.cache import CacheConfig, run_cache
    from soar_fast.data.images import CaptionError
    from soar_fast.data.shards import ShardError

    desc = ("Encode an image-caption folder once with a local SD3 (or Flux) pipeline's VAE and text encoders "
            "into a latent cache for `soar-fast train --data.source latents --data.data_dir <output_dir>`.\n"
            "  soar-fast cache --pretrained_model_name_or_path /models/sd35m --data.root /data/pets "
            "--data.resolution 512 --output_dir /cache/pets\nRe-running the same command resumes.")
    cfg = _tyro_parse(CacheConfig, argv, "soar-fast cache", desc)
    try:
        res = run_cache(cfg)
    except (NotAPipelineError, CaptionError, ShardError, FileNotFoundError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    print(f"cached {res.num_samples} samples in {res.num_shards} shards ({res.shards_written} written, "
          f"{res.shards_reused} reused, {len(res.skipped)} images skipped) to {res.output_dir}")
    return 0


def _cmd_demo(argv: Sequence[str], study: bool = False) -> int:
    from soar_fast.config import DemoConfig, StudyConfig
    from soar_fast.train.study import run_study

    cls, name = (StudyConfig, "study") if study else (DemoConfig, "demo")
    cfg = _tyro_parse(cls, argv, f"soar-fast {name}", cls.__doc__ or "")
    try:
        run_study(cfg, title=name)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume the {name} in {cfg.output_dir}", file=sys.stderr)
        return 130
    return 0


def _cmd_parity(argv: Sequence[str]) -> int:
    from soar_fast.train.parity import main as parity_main

    return parity_main(list(argv))


def _cmd_recipes(argv: Sequence[str]) -> int:
    """`soar-fast recipes [--presets]`: the recipes; with --presets also every family's
    architecture presets and their parameter counts (built on the meta device: no memory, a few
    seconds for the largest)."""
    from soar_fast.config import RECIPES

    if [a for a in argv if a != "--presets"]:
        raise UsageError(f"recipes takes only --presets, not {' '.join(a for a in argv if a != '--presets')}")
    width = max(len(n) for n in RECIPES)
    for name, fn in sorted(RECIPES.items()):
        print(f"{name:{width}s}  {(fn.__doc__ or '').splitlines()[0]}")
    if "--presets" in argv:
        from soar_fast.models.spec import preset_table

        print("\nfamily      preset            parameters  class")
        for fam, preset, n, cls in preset_table():
            size = f"{n / 1e9:8.2f} B" if n >= 1e8 else f"{n / 1e6:8.2f} M"
            print(f"{fam:11s} {preset:17s} {size}  {cls}")
    return 0


COMMANDS = {"cache": _cmd_cache, "train": _cmd_train, "plan": _cmd_plan, "sample": _cmd_sample, "eval": _cmd_eval,
            "demo": _cmd_demo, "study": lambda argv: _cmd_demo(argv, study=True), "parity": _cmd_parity,
            "recipes": _cmd_recipes}


def _report(line: str, err: BaseException, code: int = 2) -> int:
    from soar_fast.errors import format_error

    msg = format_error(line, err)
    if msg is not None:
        print(msg, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    from soar_fast.errors import configure_logging, debug_requested

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    configure_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        return _fail(f"unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}")
    from torch.distributed.checkpoint.api import CheckpointException

    from soar_fast.errors import explain
    from soar_fast.train.trainer import TrainingAborted

    try:
        return COMMANDS[cmd](rest)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except TrainingAborted as e:
        if debug:
            raise
        return _report(str(e), e, code=3)
    except UsageError as e:
        if debug:
            raise
        return _report(str(e), e)
    except Exception as e:  # noqa: BLE001 - the one error path: a user's error is one line, a bug a traceback
        line = explain(e)
        if line is None or debug:
            raise
        return _report(line, e)
    except CheckpointException as e:  # a BaseException: DCP's wrapper of each rank's error
        line = explain(e)
        if line is None or debug:
            raise
        return _report(line, e)


if __name__ == "__main__":
    sys.exit(main())
