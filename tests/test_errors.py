"""The one error path (soar_fast/errors.py): every error a user can cause is one line, exit 2,
and leaves what was written untouched; --debug shows the traceback; under torchrun a shared error
is printed once."""

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soar_fast.cli import main
from soar_fast.errors import explain, format_error

TINY = ["--recipe", "tiny", "--report_to", "none", "--logging.validation_images_per_class", "0"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished 4-step tiny LoRA run (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", *TINY, "--model.lora_rank", "4", "--output_dir", str(out)]) == 0
    return out


def _one_line(capsys, argv, *needles, code=2):
    rc = main(argv)
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == code, f"{argv} exited {rc}"
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


RESUME = ["--resume", "--max_train_steps", "6"]
# (argv after `train` + TINY + the run folder, needles); each resumes or writes into the finished LoRA run
RUN_CASES = {
    "resume_with_more_layers": (["--model.lora_rank", "4", "--model.num_layers", "2", *RESUME],
                                ["does not fit this model", "transformer_blocks.1", "--model.num_layers"]),
    "resume_with_another_width": (["--model.lora_rank", "4", "--model.attention_head_dim", "16", *RESUME],
                                  ["does not fit this model", "torch.Size([1, 64, 16]) there"]),
    "resume_lora_as_full": (["--model.lora_rank", "0", *RESUME], ["lora_rank 4", "this run has 0"]),
    "fresh_run_in_a_used_folder": (["--model.lora_rank", "4"], ["already holds another run", "--resume"]),
    "resume_a_missing_checkpoint": (["--resume_from_checkpoint", "/nonexistent/step_1"], ["does not exist"]),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_bad_input_against_a_finished_run_is_one_line_and_changes_nothing(lora_run, capsys, case):
    argv, needles = RUN_CASES[case]
    before = _digest(lora_run)
    _one_line(capsys, ["train", *TINY, "--output_dir", str(lora_run), *argv], *needles)
    assert _digest(lora_run) == before


FRESH_CASES = {
    "output_dir_is_a_file": (lambda t: ["train", *TINY, "--output_dir", str(t / "f.txt")],
                             ["f.txt", "a file"]),
    "unknown_device": (lambda t: ["train", *TINY, "--runtime.device", "tpu", "--output_dir", str(t / "r")],
                       ["runtime.device='tpu'", "cpu, cuda or cuda:N"]),
    "typo_flag": (lambda t: ["train", *TINY, "--learning_rat", "1"], ["--learning_rat", "did you mean --learning_rate"]),
    "negative_lr": (lambda t: ["train", *TINY, "--learning_rate", "-1"], ["learning_rate"]),
    "zero_batch": (lambda t: ["train", *TINY, "--train_batch_size", "0"], ["train_batch_size"]),
    "unknown_recipe": (lambda t: ["train", "--recipe", "nope"], ["unknown recipe 'nope'", "tiny"]),
    "unknown_preset": (lambda t: ["train", *TINY, "--model.preset", "nope"], ["model.preset='nope'"]),
    "unknown_family": (lambda t: ["train", *TINY, "--model.family", "nope"], ["model.family='nope'"]),
    "missing_model_folder": (lambda t: ["train", *TINY, "--pretrained_model_name_or_path", str(t / "none")],
                             ["does not exist"]),
    "flux_head_dim": (lambda t: ["train", *TINY, "--model.family", "flux", "--model.preset", "tiny"],
                      ["--model.attention_head_dim 16"]),
    "config_missing": (lambda t: ["train", "--config", str(t / "none.toml")], ["does not exist"]),
    "config_suffix": (lambda t: ["train", "--config", str(t / "f.txt")], ["unknown suffix"]),
    "unknown_rollout": (lambda t: ["train", *TINY, "--fast.rollout", "nope"], ["rollout"]),
    "latents_without_dir": (lambda t: ["train", *TINY, "--data.source", "latents"], ["data_dir"]),
    "latents_missing_dir": (lambda t: ["train", *TINY, "--data.source", "latents", "--data.data_dir", str(t / "no")],
                            ["no"]),
    "parity_unknown_variant": (lambda t: ["parity", "--variants", "nope"], ["unknown parity variants"]),
    "demo_output_is_a_file": (lambda t: ["demo", "--output_dir", str(t / "f.txt")], ["a file", "f.txt"]),
    "sample_missing_run": (lambda t: ["sample"], ["--run_dir"]),
    "eval_missing_run": (lambda t: ["eval"], ["--run_dir"]),
    "cache_missing_args": (lambda t: ["cache"], ["--pretrained_model_name_or_path"]),
    "unknown_command": (lambda t: ["nope"], ["unknown command 'nope'"]),
    "override_the_family_lacks": (lambda t: ["train", "--recipe", "tiny-zimage", "--model.num_layers", "2",
                                             "--output_dir", str(t / "r")], ["--model.num_layers does not apply"]),
    "batch_larger_than_the_data": (lambda t: ["train", "--recipe", "tiny-sd3", "--train_batch_size", "32",
                                              "--report_to", "none", "--output_dir", str(t / "r")],
                                   ["larger than the dataset (16 rows)", "--train_batch_size"]),
}


@pytest.mark.parametrize("case", sorted(FRESH_CASES))
def test_bad_input_is_one_line(tmp_path, capsys, case):
    (tmp_path / "f.txt").write_text("a file in the way\n")
    make, needles = FRESH_CASES[case]
    _one_line(capsys, make(tmp_path), *needles)
    assert (tmp_path / "f.txt").read_text() == "a file in the way\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    _one_line(capsys, ["train", *TINY, "--runtime.device", "cuda", "--output_dir", str(tmp_path / "r")],
              "no usable CUDA device", "--runtime.device cpu")


@pytest.mark.parametrize("raised, needles", [
    (OSError(errno.ENOSPC, "No space left on device"), ["no space left", "--resume"]),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 992"), ["no space left"]),
])
def test_a_full_disk_while_checkpointing_says_so(tmp_path, capsys, monkeypatch, raised, needles):
    """A full disk in the middle of a checkpoint write (simulated; the real tmpfs case is below)."""
    import soar_fast.train.trainer as trainer

    def full(*a, **k):
        raise raised

    monkeypatch.setattr(trainer, "save_checkpoint", full)
    _one_line(capsys, ["train", *TINY, "--output_dir", str(tmp_path / "r")], *needles)


def test_a_really_full_disk_is_one_line(tmp_path, capsys):
    """On a 300 kB tmpfs (where this machine may mount one): DCP's wrapped ENOSPC is one line."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        _one_line(capsys, ["train", *TINY, "--output_dir", str(mnt / "run")], "no space left", "needs about",
                  "MB free there", ".tmp-step_00000002")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_explain_knows_os_errors_and_leaves_bugs_alone(tmp_path):
    assert "permission denied" in explain(PermissionError(errno.EACCES, "Permission denied", "/x/y"))
    assert "'/x/y'" in explain(PermissionError(errno.EACCES, "Permission denied", "/x/y"))
    assert "read-only" in explain(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert "B free there" in explain(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt")))
    assert "out of GPU memory" in explain(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert explain(KeyError("a bug")) is None and explain(RuntimeError("some internal failure")) is None
    assert explain(TypeError("f() missing 1 required positional argument")) is None


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(Exception, match="learning_rate"):
        main(["train", *TINY, "--learning_rate", "-1", "--debug"])
    monkeypatch.setenv("SOAR_FAST_DEBUG", "1")
    with pytest.raises(Exception, match="tpu"):
        main(["train", *TINY, "--runtime.device", "tpu", "--output_dir", str(tmp_path / "r")])


def test_under_torchrun_a_shared_error_is_printed_by_rank_0_only(monkeypatch):
    from soar_fast.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert format_error("bad flag", ConfigError("bad flag")) is None
    assert format_error("disk", OSError(errno.ENOSPC, "x")) == "soar-fast: error: rank 1: disk"
    monkeypatch.setenv("RANK", "0")
    assert format_error("bad flag", ConfigError("bad flag")) == "soar-fast: error: bad flag"


def test_torchrun_with_a_bad_flag_prints_one_line(tmp_path):
    """Two ranks, one bad value: one line in all of torchrun's output, both ranks exit 2."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "soar_fast.train", *TINY, "--learning_rate", "-1", "--output_dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "soar-fast: error:" in ln]
    assert proc.returncode != 0 and len(lines) == 1 and "learning_rate" in lines[0], lines
