"""The step benchmark runs in smoke mode (tiny config, CPU) and writes well-formed JSON rows."""

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_step_smoke_rows(tmp_path):
    bench = _load_bench()
    out = tmp_path / "step.json"
    assert bench.main(["--smoke", "--variants", "a,b,f,sft", "--no_compile", "--batch", "1", "--num_aux", "2",
                       "--attention_backends", "sdpa,sdpa_math", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    required = {"bench", "provider", "metric", "value", "unit", "device", "torch", "commit", "date"}
    assert all(required <= set(r) for r in rows)
    by = {(r["provider"], r["metric"]): r for r in rows}
    for v in ("a", "b", "f", "sft"):
        assert by[(v, "ms_per_step_p50")]["value"] > 0
        assert 0 < by[(v, "mfu")]["value"] < 1.5
        assert by[(v, "tflops")]["flops_per_step"] > 0
    assert by[("b", "speedup_vs_a")]["baseline"] == "a"
    # SOAR at M=2 does 3·3 + 2 = 11 forward-equivalents per sample, SFT 3: the FLOP ratio is 11/3
    ratio = by[("b", "tflops")]["flops_per_step"] / by[("sft", "tflops")]["flops_per_step"]
    assert abs(ratio - 11 / 3) < 1e-9
    assert by[("sdpa_math", "ms_p50")]["value"] > 0


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
