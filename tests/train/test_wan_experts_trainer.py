"""Wan 2.2's two experts through `soar-fast train` (issue 16 item 3): a WanPipeline folder with
`transformer/`, `transformer_2/` and `boundary_ratio` trains as one `WanExperts` (every model call
of the step routed by σ), `--model.train_experts` picks which experts learn (full or LoRA), and
`final/` holds them as the pipeline does (`transformer/` high noise, `transformer_2/` low noise)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from soar_fast.cli import main
from soar_fast.models.spec import get_family

WAN = get_family("wan")
FLAGS = ["--recipe", "tiny-wan", "--max_train_steps", "2", "--report_to", "none", "--checkpointing_steps", "0",
         "--learning_rate", "1e-3"]


def _wan22_folder(root, boundary=0.75):  # about the median σ of shift 3: both experts get rows
    WAN.build("tiny", seed=0).save_pretrained(root / "transformer")
    WAN.build("tiny", seed=1).save_pretrained(root / "transformer_2")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "boundary_ratio": boundary, "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    return root


def _weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train, step", [("low", "eager"), ("high", "fast"), ("both", "fast")])
def test_full_fine_tune_trains_the_chosen_experts(tmp_path, train, step):
    src = _wan22_folder(tmp_path / "wan22")
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--pretrained_model_name_or_path", str(src), "--model.train_experts", train,
                 "--runtime.step", step, "--output_dir", str(out)]) == 0
    final = out / "final"
    assert json.loads((final / "model_index.json").read_text())["boundary_ratio"] == 0.75
    for sub, name in (("transformer", "high"), ("transformer_2", "low")):
        unchanged = _same(_weights(final / sub), _weights(src / sub))
        assert unchanged == (train not in ("both", name)), (sub, train)
        assert WAN.from_pretrained(str(final), subfolder=sub) is not None  # diffusers loads each expert


def test_lora_on_both_experts_exports_two_adapters(tmp_path):
    src = _wan22_folder(tmp_path / "wan22")
    out = tmp_path / "lora"
    assert main(["train", *FLAGS, "--pretrained_model_name_or_path", str(src), "--model.lora_rank", "4",
                 "--output_dir", str(out)]) == 0
    high = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    low = load_file(str(out / "final" / "transformer_2" / "pytorch_lora_weights.safetensors"))
    assert high.keys() == low.keys() and any("lora_A" in k for k in high)
    assert not all(torch.equal(high[k], low[k]) for k in high)  # each expert its own adapters


def test_a_frozen_expert_owning_every_row_is_no_error(tmp_path):
    """boundary 0.001: every σ goes to the high expert; training only the low one gets no gradient
    (the micro-steps skip their backward) and leaves it as it was, without failing."""
    src = _wan22_folder(tmp_path / "wan22", boundary=0.001)
    out = tmp_path / "run"
    assert main(["train", *FLAGS, "--pretrained_model_name_or_path", str(src), "--model.train_experts", "low",
                 "--output_dir", str(out)]) == 0
    assert _same(_weights(out / "final" / "transformer_2"), _weights(src / "transformer_2"))


def test_a_bad_expert_choice_is_one_line(tmp_path, capsys):
    rc = main(["train", *FLAGS, "--model.train_experts", "middle", "--output_dir", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2 and len(err) == 1 and "train_experts" in err[0], err
