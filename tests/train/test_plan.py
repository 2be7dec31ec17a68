"""The memory planner (soar_fast.train.plan): the committed H200 peaks within 10 %, parts that add
up, FSDP2 sharding, LoRA, the 24 GiB choice for SD3.5-M SOAR, and `soar-fast plan` on the command line."""

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from soar_fast.cli import main
from soar_fast.train.plan import GIB, PARTS, fit_to_memory, plan_memory, usable_bytes

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "benchmarks" / "results" / "h200" / "2026-11-26"
SD35M = ["--model.family", "sd3", "--model.preset", "sd35-medium", "--data.source", "synthetic",
         "--data.latent_size", "64", "--data.prompt_tokens", "154", "--train_batch_size", "2", "--soar.num_aux", "6",
         "--mixed_precision", "bf16", "--runtime.step", "fast", "--report_to", "none"]
TINY = ["--recipe", "tiny", "--report_to", "none"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lib():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return _load("step_lib")


def _sd35m(lib, variant="c", precision="trainer", **fast):
    cfg = lib.variant_config(variant, precision, lib.Shape(batch=2, latent=64), "cpu")
    if fast:
        cfg.fast = dataclasses.replace(cfg.fast, **fast)
    return cfg


def _measured():
    """(file, provider, batch, latent) -> measured peak GiB, every peak_memory row of 2026-11-26."""
    out = {}
    for f in sorted(H200.glob("step_*.json")):
        for r in json.loads(f.read_text()):
            if r.get("metric") == "peak_memory":
                b, _c, _h, w = map(int, re.match(r"B(\d+)x(\d+)x(\d+)x(\d+)", r["shape"]).groups())
                out[(f.name, r["provider"], b, w)] = r["value"]
    return out


def test_every_2026_11_26_peak_within_10_percent(tmp_path):
    """`bench_step.py --plan_only --precision pure_bf16 --plan_harness 2026-11-26` (a plain bf16
    module, as those rows ran) against every measured peak: 512 px and 1024 px."""
    bench = _load("bench_step")
    measured = _measured()
    assert len(measured) >= 17
    shapes = sorted({(b, w) for (_f, _p, b, w) in measured})
    for b, w in shapes:
        variants = sorted({p for (_f, p, bb, ww) in measured if (bb, ww) == (b, w)})
        out = tmp_path / f"plan_{w}.json"
        assert bench.main(["--plan_only", "--precision", "pure_bf16", "--plan_harness", "2026-11-26",
                           "--resolution", str(8 * w), "--batch", str(b), "--variants", ",".join(variants),
                           "--out", str(out)]) == 0
        rows = {r["provider"]: r for r in json.loads(out.read_text())}
        for (f, p, bb, ww), peak in measured.items():
            if (bb, ww) != (b, w):
                continue
            r = rows[p]
            assert r["metric"] == "predicted_peak_gib" and r["bench"] == "soar_step" and r["variant"] == p
            assert r["config"]["harness"] == "bench@e2e6267" and r["config"]["precision"] == "pure_bf16"
            err = (r["value"] - peak) / peak
            assert abs(err) <= 0.10, f"{f} {p}: predicted {r['value']:.2f} GiB, measured {peak:.2f} ({err:+.1%})"


def test_parts_add_up_and_the_peak_is_the_largest_phase(lib):
    for cfg in (_sd35m(lib), _sd35m(lib, "e"), _sd35m(lib, "g", "pure_bf16"), _sd35m(lib, "sft")):
        plan = plan_memory(cfg)
        assert set(plan.parts) == set(PARTS)
        assert sum(plan.parts.values()) == pytest.approx(plan.peak)
        assert all(sum(v.values()) <= plan.peak * (1 + 1e-12) for v in plan.phases.values())
        assert plan.phases[plan.phase] == plan.parts


@pytest.mark.parametrize("recipe", ["tiny", "tiny-flux", "tiny-flux2", "tiny-qwenimage", "tiny-wan", "tiny-zimage"])
def test_every_family_plans(recipe):
    from soar_fast.config import get_recipe

    plan = plan_memory(get_recipe(recipe))
    assert plan.peak > 0 and plan.stats.tokens > 0 and sum(plan.stats.blocks_saved) > 0
    assert sum(plan.parts.values()) == pytest.approx(plan.peak)


def test_fsdp_over_8_ranks_divides_the_sharded_parts(lib):
    cfg = _sd35m(lib, "e")
    cfg.optim = dataclasses.replace(cfg.optim, use_ema=True)
    one, eight = plan_memory(cfg, 1), plan_memory(cfg, 8)
    for phase in one.phases:
        for part in ("weights", "optimizer_states", "ema", "optimizer_temporaries"):
            assert eight.phases[phase][part] == pytest.approx(one.phases[phase][part] / 8)
        for part in ("activations", "rollout_replica", "compute_copies", "cuda_graph_pools"):
            assert eight.phases[phase][part] == pytest.approx(one.phases[phase][part])
    assert eight.phases["optimizer step"]["gradients"] == pytest.approx(one.phases["optimizer step"]["gradients"] / 8)
    assert one.stats.total == 2_243_171_520  # docs/sd35.md "Sizes and memory"
    assert one.phases["optimizer step"]["weights"] == pytest.approx(one.stats.total * 4)  # fp32 master
    assert one.parts["rollout_replica"] == pytest.approx(one.stats.total * 2)  # bf16, unsharded


def test_lora_trains_adapters_only(lib):
    full = plan_memory(_sd35m(lib))
    cfg = _sd35m(lib)
    cfg.model = dataclasses.replace(cfg.model, lora_rank=16)
    lora = plan_memory(cfg)
    op = "optimizer step"
    assert lora.stats.trainable < 0.01 * lora.stats.total
    assert lora.phases[op]["gradients"] < 0.01 * full.phases[op]["gradients"]
    assert lora.phases[op]["optimizer_states"] < 0.01 * full.phases[op]["optimizer_states"]
    assert lora.phases[op]["weights"] >= full.phases[op]["weights"]  # the frozen base stays
    assert lora.activations_no_ac < full.activations_no_ac  # frozen Linears save no inputs for weight grads


def test_checkpointing_and_micro_chunks_shrink_activations(lib):
    base = plan_memory(_sd35m(lib))
    ac = plan_memory(_sd35m(lib, activation_checkpointing=True))
    chunked = plan_memory(_sd35m(lib, micro_chunks=7))
    bwd = "backward start"
    assert ac.phases[bwd]["activations"] == pytest.approx(base.activations_ac)
    assert base.activations_ac < 0.2 * base.activations_no_ac
    assert chunked.samples == 2 and chunked.phases["backward start"]["activations"] < base.parts["activations"] / 5


def test_24_gib_choice_for_sd35m_512px_m6_fits_by_the_planner(lib):
    """Issue 17 item 3: SD3.5-M, 512 px, M = 6 on a 24 GiB card."""
    cfg = _sd35m(lib)
    assert plan_memory(cfg).peak > usable_bytes(24)
    choice = fit_to_memory(cfg, 24)
    assert choice.fits and choice.flags
    assert plan_memory(choice.cfg).peak <= usable_bytes(24) < 24 * GIB
    assert choice.cfg.model.lora_rank > 0  # fp32 master + grads + AdamW states of 2.2 B params alone exceed 24 GiB
    assert any("8-bit" in n for n in choice.notes) and any("FP8 storage" in n for n in choice.notes)


def test_soar_fast_plan_prints_one_table(capsys):
    assert main(["plan", *SD35M]) == 0
    out = capsys.readouterr().out
    assert out.count("peak per rank") == 1 and out.count("\npart ") + out.startswith("part ") == 1
    for part in PARTS:
        assert re.search(rf"^{part}\s+\d+\.\d\d$", out, re.M), part


def test_soar_fast_plan_help(capsys):
    assert main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--gpu_memory" in out and "--world_size" in out and "--train_batch_size" in out


def test_soar_fast_plan_recipe_on_24_gib(tmp_path, capsys):
    """The sd35m-soar recipe (the folder's config.json is all the planner reads) on a 24 GiB card."""
    from soar_fast.models.sd3 import SD3_PRESETS

    folder = tmp_path / "sd35m"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    config = {"_class_name": "SD3Transformer2DModel", **SD3_PRESETS["sd35-medium"]}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--recipe", "sd35m-soar", "--pretrained_model_name_or_path", str(folder),
                 "--data.data_dir", str(tmp_path / "no_cache"), "--gpu_memory", "24"]) == 0
    out = capsys.readouterr().out
    assert out.count("peak per rank") == 1
    choice = re.search(r"^choice for 24 GiB: add (.+) -> predicted peak ([\d.]+) GiB of ([\d.]+) usable$", out, re.M)
    assert choice and float(choice[2]) <= float(choice[3]) and "--model.lora_rank" in choice[1]
    assert "no readable latent cache" in out and "not an option today: 8-bit AdamW" in out


@pytest.mark.parametrize("argv, needle", [
    (["--gpu_memory", "lots"], "--gpu_memory 'lots' is invalid"),
    (["--gpu_memory", "0.5"], "too small for any choice"),
    (["--world_size", "0"], "--world_size '0' is invalid"),
    (["--train_batch_size", "many"], "train_batch_size"),
    (["--model.presett", "tiny"], "presett"),
], ids=["gpu_memory_word", "gpu_memory_too_small", "world_size_0", "batch_word", "unknown_flag"])
def test_bad_flags_are_one_line(capsys, argv, needle):
    rc = main(["plan", *TINY, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("soar-fast: error:") and needle in err[0], err


def test_bench_plan_only_smoke_rows(tmp_path):
    bench = _load("bench_step")
    out = tmp_path / "plan.json"
    assert bench.main(["--plan_only", "--smoke", "--variants", "a,c,e,f,g,sft,c:pure_bf16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["a", "c", "e", "f", "g", "sft", "c:pure_bf16"]
    for r in rows:
        assert {"bench", "provider", "variant", "config", "metric", "value", "unit", "device", "commit"} <= set(r)
        assert r["metric"] == "predicted_peak_gib" and r["value"] > 0
        assert sum(r["parts_gib"].values()) == pytest.approx(r["value"])
    by = {r["provider"]: r for r in rows}
    assert by["e"]["parts_gib"]["rollout_replica"] > 0 and by["c"]["parts_gib"]["rollout_replica"] == 0
    assert by["f"]["parts_gib"]["fp8_weight_copies"] > 0


@pytest.mark.parametrize("recipe, gib", [("sd35l-soar", 48), ("flux-dev-soar", 48), ("flux-kontext-dev-soar", 48),
                                         ("flux2-dev-soar", 141), ("flux2-klein-4b-soar", 24), ("qwenimage-soar", 80), ("zimage-soar", 48), ("wan21-1.3b-soar", 48),
                                         ("wan21-14b-soar", 0)])
def test_each_family_real_recipe_plans_a_fitting_choice(recipe, gib, capsys):
    """The real recipes plan from their preset alone (no weights, no cache) and fit the GPU sizes
    of docs/families.md "Real recipes"; `soar-fast train` without their paths is one line."""
    from soar_fast.config import get_recipe
    from soar_fast.config.recipes import FAMILY_RECIPES

    spec = next(r for r in FAMILY_RECIPES if r.name == recipe)
    cfg = get_recipe(recipe)
    assert (cfg.model.family, cfg.model.preset, cfg.model.lora_rank) == (spec.family, spec.preset, spec.lora_rank)
    assert cfg.optim.train_batch_size * cfg.optim.gradient_accumulation_steps == 32 and cfg.soar.num_aux == 6
    if not gib:  # 81 frames of the 14B model fit no single GPU (docs/families.md): the planner says so in one line
        assert main(["plan", "--recipe", recipe, "--data.data_dir", "no_cache", "--gpu_memory", "141"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "too small for any choice" in err[0] and "GiB at the least" in err[0], err
        return
    assert main(["plan", "--recipe", recipe, "--data.data_dir", "no_cache", "--gpu_memory", str(gib)]) == 0
    out = capsys.readouterr().out
    choice = re.search(r"^choice for \d+ GiB: add (.+) -> predicted peak ([\d.]+) GiB of ([\d.]+) usable$", out, re.M)
    assert choice and float(choice[2]) <= float(choice[3])
    if spec.family == "wan":  # no cache: a video shape (81 frames at 512 px, umT5's 512 tokens), not an image
        assert "(512 px, 81 frames) and 512 text tokens" in out
    if spec.reference:  # Kontext without a cache: the input image's tokens planned beside the output's
        assert "(512 px, an input image of the same size)" in out
    assert main(["train", "--recipe", recipe, "--data.data_dir", "no_cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pretrained_model_name_or_path" in err[0], err
