"""The step benchmark runs in smoke mode (tiny config, CPU) and writes well-formed JSON rows."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    return _load("bench_step")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_step_smoke_rows(tmp_path):
    """Every variant but (a) is built by build_train_step; each row names what ran."""
    bench = _load_bench()
    out = tmp_path / "step.json"
    assert bench.main(["--smoke", "--variants", "a,b,f,sft,c:pure_bf16", "--no_compile", "--batch", "1",
                       "--num_aux", "2", "--attention_backends", "sdpa,sdpa_math", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    required = {"bench", "provider", "metric", "value", "unit", "device", "torch", "commit", "date"}
    assert all(required <= set(r) for r in rows)
    by = {(r["provider"], r["metric"]): r for r in rows}
    for v in ("a", "b", "f", "sft", "c:pure_bf16"):
        assert by[(v, "ms_per_step_p50")]["value"] > 0
        assert 0 < by[(v, "mfu")]["value"] < 1.5
        assert by[(v, "tflops")]["flops_per_step"] > 0
    assert by[("b", "speedup_vs_a")]["baseline"] == "a:fp32"
    # the FP8 variants' second MFU, against the FP8 GEMM rate of the same run (float8 _scaled_mm runs on CPU too)
    fp8 = [r for r in rows if r["bench"] == "fp8_gemm_8192"]
    if fp8:
        assert by[("f", "mfu_fp8")]["measured_fp8_peak_tflops"] == fp8[0]["value"] > 0
        assert ("b", "mfu_fp8") not in by
    assert by[("c:pure_bf16", "speedup_vs_a")]["baseline"] == "a:fp32"  # no (a) of its own precision ran
    # the resolved configuration: what build_train_step built, precision policy included
    cb, cf = by[("b", "mfu")]["config"], by[("f", "mfu")]["config"]
    assert (cb["step"], cb["ops_backend"], cb["rollout"], cb["compile"], cb["world_size"]) == \
        ("fast", "reference", "eager", "none", 1)
    assert (cf["rollout_requested"], cf["rollout"]) == ("cuda_graph_fp8", "fp8")  # no CUDA here: FP8, no graph
    assert (cb["precision"], cb["weight_dtype"], cb["compute_dtype"]) == ("fp32", "float32", "float32")
    cp = by[("c:pure_bf16", "mfu")]["config"]
    assert (cp["precision"], cp["weight_dtype"], cp["compute_dtype"]) == ("pure_bf16", "bfloat16", "bfloat16")
    assert by[("a", "mfu")]["config"]["step"] == "release_structure"
    assert by[("f", "rollout_refresh_ms_p50")]["value"] > 0
    # SOAR at M=2 does 3·3 + 2 = 11 forward-equivalents per sample, SFT 3: the FLOP ratio is 11/3
    ratio = by[("b", "tflops")]["flops_per_step"] / by[("sft", "tflops")]["flops_per_step"]
    assert abs(ratio - 11 / 3) < 1e-9
    assert by[("sdpa_math", "ms_p50")]["value"] > 0


def test_bench_step_refuses_an_unknown_variant_or_precision(capsys):
    bench = _load_bench()
    for spec, what in (("z", "unknown variant 'z'"), ("e:fp16", "unknown precision 'fp16'")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--smoke", "--variants", spec])
        assert e.value.code == 2 and what in capsys.readouterr().err


def test_bench_train_runs_the_benchmarked_config_through_soar_fast_train(tmp_path):
    """bench_train: the step benchmark's row and `python -m soar_fast.train --config` on the same
    TrainConfig; the ratio row is written (its value is a GPU goal, not checked on a shared CPU)."""
    train = _load("bench_train")
    out = tmp_path / "train.json"
    assert train.main(["--smoke", "--no_compile", "--variant", "c", "--num_aux", "2", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text()) if r["bench"] == "trainer_e2e"]
    by = {r["metric"]: r for r in rows}
    assert by["trainer_samples_per_s"]["value"] > 0 and len(by["trainer_samples_per_s"]["windows"]) == 2
    assert by["trainer_vs_bench"]["value"] == by["trainer_samples_per_s"]["value"] / by["bench_samples_per_s"]["value"]
    assert by["trainer_vs_bench"]["goal"] == 0.95 and by["trainer_vs_bench"]["config"]["ops_backend"] == "reference"


def test_release_style_baseline_is_the_same_loss_in_fp32():
    """Variant (a) computes SOAR's loss (only its structure differs): equal to the reference in fp32."""
    import soar_fast as sf
    from soar_fast.models import SD3VelocityFn, build_sd3_transformer

    bench = _load_bench()
    model = build_sd3_transformer("tiny")
    z0 = torch.randn(2, 4, 6, 6)
    cond, uncond = (torch.randn(2, 5, 32), torch.randn(2, 64)), (torch.zeros(5, 32), torch.zeros(64))
    config = sf.SoarConfig(num_aux=3)
    draws = sf.sample_draws(z0, config, torch.Generator().manual_seed(0))
    loss = bench.release_style_step(SD3VelocityFn(model), z0, cond, uncond, config, draws, torch.float32)
    ref = sf.soar_loss_from_draws(SD3VelocityFn(model), z0, cond, uncond, config, draws)
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()


def test_profile_breakdown_rows_cover_the_step_and_the_summary_table(tmp_path, capsys):
    """`--profile`: one profile_ms row per category for the profiled variants only; the categories add
    up to the profiled step time, the step's own ranges (rollout, optimizer, SOAR ops) are found,
    and summarize_gpu prints the table."""
    bench = _load_bench()
    out = tmp_path / "step_512.json"
    assert bench.main(["--smoke", "--variants", "c,g_ao", "--no_compile", "--batch", "1", "--num_aux", "2",
                       "--profile", "2", "--profile_variants", "g_ao", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text()) if r["metric"] == "profile_ms"]
    assert {r["provider"] for r in rows} == {"g_ao"}
    lib = _load("step_lib")
    cats = {r["category"]: r for r in rows}
    assert tuple(cats) == lib.PROFILE_CATEGORIES
    wall = rows[0]["profiled_wall_ms"]
    assert sum(r["value"] for r in rows) == pytest.approx(wall, rel=1e-6)
    assert all(cats[c]["value"] > 0 for c in ("gemm", "elementwise", "optimizer", "rollout", "soar_ops"))
    capsys.readouterr()
    assert _load("summarize_gpu").main([str(tmp_path)]) == 0
    assert "| g_ao | " in capsys.readouterr().out


def test_bench_memory_smoke_rows(tmp_path):
    """bench_memory.py (the planner's choice per GPU size, run under a memory fraction on a GPU): on a
    CPU the tiny config runs the chosen step (LoRA here) and a size no choice fits is a skipped row."""
    out = tmp_path / "memory.json"
    assert _load("bench_memory").main(["--smoke", "--gpu_memory", "0.001,24", "--lora_rank", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    by = {(r["provider"], r["metric"]): r for r in rows}
    assert by[("0.001GiB", "skipped")]["planner_fits"] is False
    ran = by[("24GiB", "ms_per_step_p50")]
    assert ran["value"] > 0 and ran["flags"] == "(as is)" and ran["predicted_peak_gib"] > 0
    assert 0 < ran["trainable_parameters"] < ran["parameters"] / 5  # LoRA adapters only


def test_bench_step_runs_a_video_family_with_lora(tmp_path):
    """--family wan --frames 2 --lora_rank 4: video latents [B, C, F, H, W] through (a) and the fast step, the
    model built as the trainer builds it (adapters only train), FLOPs counted for all frames."""
    from soar_fast.config import ModelConfig
    from soar_fast.train.build import build_model

    bench = _load_bench()
    out = tmp_path / "wan.json"
    assert bench.main(["--smoke", "--family", "wan", "--frames", "2", "--lora_rank", "4", "--variants", "a,c",
                       "--no_compile", "--batch", "1", "--num_aux", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    by = {(r["provider"], r["metric"]): r for r in rows}
    assert by[("c", "mfu")]["shape"].startswith("B1x(") and ", 2, 8, 8)" in by[("c", "mfu")]["shape"]
    assert by[("c", "mfu")]["lora_rank"] == 4 and by[("c", "speedup_vs_a")]["value"] > 0
    fam, model = build_model(ModelConfig(family="wan", preset="tiny", lora_rank=4))  # the adapters' GEMMs count too
    flops = fam.step_flops(model, 1, 2, 8, 8, 7, frames=2)
    assert by[("c", "tflops")]["flops_per_step"] == pytest.approx(flops)
    assert flops > fam.step_flops(model, 1, 2, 8, 8, 7) * 1.5  # both latent frames counted
