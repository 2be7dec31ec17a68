"""The `soar-fast` command line: help, a short train/eval/sample run, SIGTERM, and bad input.

Every bad input must exit with status 2, print exactly one line naming the fix, and leave what
was already written untouched."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soar_fast.cli import main
from soar_fast.config import TrainConfig

TINY = ["--recipe", "tiny", "--report_to", "none", "--logging.validation_images_per_class", "0"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bad(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if ln.startswith("soar-fast: error:")]
    assert rc == 2, f"{argv} exited {rc}"
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step tiny run (checkpoints at 2 and 4, final model)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--output_dir", str(out)]) == 0
    return out


def test_help_explains_every_field(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for section in dataclasses.fields(TrainConfig):
        if section.name == "recipe":
            continue
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else type(getattr(TrainConfig(), section.name))):
            assert f"{section.name}.{f.name}" in text or f"--{f.name}" in text, f"{section.name}.{f.name} missing from --help"
    for flag in ("--learning_rate", "--train_batch_size", "--max_train_steps", "--mixed_precision", "--output_dir",
                 "--resume_from_checkpoint", "--checkpointing_steps", "--seed", "--recipe", "--config"):
        assert flag in text
    assert "Peak (constant) learning rate" in text
    for cmd in ("eval", "sample", "demo"):
        assert main([cmd, "--help"]) == 0
        assert "--num_samples" in capsys.readouterr().out


def test_train_writes_a_complete_run_folder(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["recipe"] == "tiny" and cfg["optim"]["max_train_steps"] == 4
    assert (run_dir / "final" / "transformer" / "config.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_eval_and_sample_on_the_tiny_run(run_dir, capsys, tmp_path):
    rc = main(["eval", "--run_dir", str(run_dir), "--num_samples", "20", "--num_inference_steps", "4",
               "--exposure_samples", "8", "--exposure_sigmas", "3"])
    assert rc == 0
    res = json.loads((run_dir / "eval.json").read_text())
    assert 0 <= res["accuracy"] <= 1 and res["frechet_distance"] > 0 and len(res["exposure"]["sigma"]) == 3
    assert "accuracy" in capsys.readouterr().out
    png = tmp_path / "s.png"
    assert main(["sample", "--run_dir", str(run_dir), "--num_samples", "4", "--num_inference_steps", "2",
                 "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_config_file_and_flags_override_the_recipe(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlearning_rate = 3e-4\n[soar]\nnum_aux = 0\n')
    out = tmp_path / "run"
    assert main(["train", *TINY, "--config", str(toml), "--max_train_steps", "1", "--output_dir", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optim"]["learning_rate"] == 3e-4 and cfg["soar"]["num_aux"] == 0 and cfg["optim"]["max_train_steps"] == 1


def test_bad_recipe_field_and_types(capsys, tmp_path):
    _bad(capsys, ["train", "--recipe", "digits-sfft"], "unknown recipe", "did you mean 'digits-sft'")
    _bad(capsys, ["train", *TINY, "--optim.learnig_rate", "1"], "Unrecognized options", "did you mean --learning_rate?")
    _bad(capsys, ["train", *TINY, "--num_aux", "1"], "--num_aux", "did you mean --soar.num_aux?")
    _bad(capsys, ["train", *TINY, "--learning_rate", "fast"], "could not convert", "fast")
    _bad(capsys, ["train", *TINY, "--learning_rate", "-1"], "optim.learning_rate", "> 0")
    _bad(capsys, ["train", *TINY, "--mixed_precision", "fp8"], "fp8", "bf16")
    _bad(capsys, ["train", *TINY, "--soar.num_aux", "-2"], "num_aux", ">= 0")
    _bad(capsys, ["bake"], "unknown command")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearnin_rate = 1e-4\n")
    _bad(capsys, ["train", "--config", str(bad)], "unknown field 'optim.learnin_rate'", "did you mean 'optim.learning_rate'")
    bad.write_text('[optim]\ntrain_batch_size = "big"\n')
    _bad(capsys, ["train", "--config", str(bad)], "optim.train_batch_size", "integer")
    _bad(capsys, ["train", "--config", str(tmp_path / "nope.toml")], "does not exist")


def test_an_output_folder_of_another_run_is_refused_unless_resuming(run_dir, capsys):
    before = _digest(run_dir)
    _bad(capsys, ["train", *TINY, "--output_dir", str(run_dir)], "already holds another run", "--resume")
    assert _digest(run_dir) == before


def test_resume_continues_and_a_corrupt_checkpoint_falls_back_or_is_refused(run_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    (run / "final").rename(tmp_path / "final-aside")
    newest = run / "checkpoints" / "step_00000004" / "__0_0.distcp"
    newest.write_bytes(newest.read_bytes()[:100])
    _bad(capsys, ["train", *TINY, "--output_dir", str(run), "--resume_from_checkpoint", str(newest.parent)],
         "no loadable checkpoint", "truncated")
    assert main(["train", *TINY, "--output_dir", str(run), "--resume", "--max_train_steps", "5"]) == 0
    assert "done: 5 steps" in capsys.readouterr().out
    from soar_fast.train.checkpoint import find_checkpoints, verify_checkpoint

    assert verify_checkpoint(find_checkpoints(run / "checkpoints")[0])["step"] == 5


def test_a_checkpoint_of_soar_fast_0_1_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "old"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / "model.safetensors").write_bytes(b"0.1")
    before = _digest(run)
    _bad(capsys, ["train", *TINY, "--output_dir", str(run), "--resume"], "checkpoint-2",
         "single-process checkpoint of soar_fast 0.1", "--output_dir")
    assert _digest(run) == before


def test_missing_model_folder_and_bad_sampling_arguments(run_dir, capsys, tmp_path):
    _bad(capsys, ["train", *TINY, "--output_dir", str(tmp_path / "x"), "--pretrained_model_name_or_path",
                  str(tmp_path / "no-such-model")], "does not exist", "digits-pretrain")
    assert not (tmp_path / "x" / "config.json").exists()
    _bad(capsys, ["eval", "--run_dir", str(tmp_path / "nowhere")], "no config.json", "--run_dir")
    _bad(capsys, ["eval", "--run_dir", str(run_dir), "--weights", "online"], "transformer_online", "--use_ema")
    for cmd in ("eval", "sample"):
        _bad(capsys, [cmd, "--run_dir", str(run_dir), "--num_samples", "0"], "num_samples=0", ">= 1")
        _bad(capsys, [cmd, "--run_dir", str(run_dir), "--guidance_scale", "-1"], "guidance_scale=-1.0", ">= 0")
    _bad(capsys, ["demo", "--num_samples", "0"], "num_samples=0")
    _bad(capsys, ["demo", "--guidance_scales", "-0.5"], "guidance_scale")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "soar_fast.cli", "train", *TINY, "--output_dir", str(out),
           "--max_train_steps", "100000", "--checkpointing_steps", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            if len(rows) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    from soar_fast.train.checkpoint import find_checkpoints, verify_checkpoint

    ckpts = find_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1
    step = verify_checkpoint(ckpts[0])["step"]
    assert 2 <= step < 100000
    assert not (out / "final").exists()


def test_yaml_config_and_the_saved_json_round_trip(tmp_path):
    pytest.importorskip("yaml")
    from soar_fast.config import get_recipe, load_config_file, load_config_json, save_config_json

    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  learning_rate: 5.0e-4\n  use_ema: true\nsoar:\n  sigma_hi_ratio: 1.5\n")
    cfg = load_config_file(y, base=get_recipe("digits-soar"))
    assert cfg.optim.learning_rate == 5e-4 and cfg.optim.use_ema and cfg.soar.sigma_hi_ratio == 1.5
    assert cfg.soar.num_aux == get_recipe("digits-soar").soar.num_aux  # untouched fields keep the recipe's
    save_config_json(cfg, tmp_path / "config.json")
    assert load_config_json(tmp_path / "config.json") == cfg


def test_natural_values_are_read():
    """What users of diffusers' scripts type: boolean words, integral floats, commas, fp32."""
    from soar_fast.cli import _parse_train

    cfg = _parse_train(["--recipe", "tiny", "--use_ema", "true", "--logging.progress_bar", "false",
                        "--max_train_steps", "1e3", "--train_batch_size", "8.0", "--mixed_precision", "fp32",
                        "--model.lora_rank", "4", "--model.lora_target_modules", "to_q,to_k"])
    assert cfg.optim.use_ema is True and cfg.logging.progress_bar is False
    assert (cfg.optim.max_train_steps, cfg.optim.train_batch_size) == (1000, 8)
    assert cfg.runtime.mixed_precision == "no" and cfg.model.lora_target_modules == ("to_q", "to_k")
    assert _parse_train(["--recipe", "tiny", "--use_ema", "no"]).optim.use_ema is False
    with pytest.raises(Exception, match="max_train_steps"):  # 2.5 steps stays an error
        _parse_train(["--recipe", "tiny", "--max_train_steps", "2.5"])
