"""torchao float8 training GEMMs behind `--fast.fp8_training_backend torchao` (soar_fast.fast.torchao_fp8):
which Linears convert, unchanged state_dict keys, LoRA, the trainer end to end (the SOAR loss curve
within 1% of full precision: tests/fast/test_step_parity.py), and the one-line fallback to the native FP8 linear without torchao."""

import logging
import sys

import pytest

from soar_fast.fast.fp8 import Fp8TrainLinear, _eligible, enable_fp8_training
from soar_fast.models import build_sd3_transformer

float8 = pytest.importorskip("torchao.float8.float8_linear")


@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_the_eligible_block_linears_become_float8_linear(scaling):
    model = build_sd3_transformer("digits")
    want = {name for name, m in model.named_modules() if _eligible(name, m)}
    keys = set(model.state_dict())
    assert enable_fp8_training(model, backend="torchao", scaling=scaling) == len(want) > 0
    got = {name for name, m in model.named_modules() if type(m) is float8.Float8Linear}
    assert got == want
    assert not any(isinstance(m, Fp8TrainLinear) for m in model.modules())
    assert set(model.state_dict()) == keys  # checkpoints and exports keep the diffusers names


def test_lora_base_layers_convert_and_only_adapters_train():
    from soar_fast.models.lora import LoraSettings, apply_lora

    model = build_sd3_transformer("digits")
    apply_lora(model, LoraSettings(rank=4))
    n = enable_fp8_training(model, backend="torchao")
    converted = {name for name, m in model.named_modules() if type(m) is float8.Float8Linear}
    bases = {name for name, _ in model.named_modules() if name.endswith("base_layer")}
    assert n == len(converted) and bases and bases <= converted  # the frozen bases run FP8 GEMMs
    assert not any("lora_" in name for name in converted)  # the adapters stay in full precision
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


def test_the_trainer_runs_on_torchao_linears(tmp_path, caplog):
    from soar_fast.cli import main

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="soar_fast.fast.torchao_fp8"):
        rc = main(["train", "--recipe", "tiny", "--max_train_steps", "2", "--runtime.step", "fast",
                 "--fast.fp8_training", "--fast.fp8_training_backend", "torchao", "--report_to", "none",
                 "--output_dir", str(out)])
    assert rc == 0 and (out / "final").is_dir()
    assert any("torchao Float8Linear" in r.getMessage() for r in caplog.records), caplog.text


def test_without_torchao_one_log_line_and_the_native_linear(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import raises ImportError
    model = build_sd3_transformer("digits")
    with caplog.at_level(logging.WARNING, logger="soar_fast.fast.torchao_fp8"):
        n = enable_fp8_training(model, backend="torchao")
    lines = [r.getMessage() for r in caplog.records if r.name == "soar_fast.fast.torchao_fp8"]
    assert len(lines) == 1 and "native FP8 linear" in lines[0] and "pip install torchao" in lines[0]
    assert n == sum(isinstance(m, Fp8TrainLinear) for m in model.modules()) > 0
