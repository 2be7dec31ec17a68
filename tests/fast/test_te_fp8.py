"""The Transformer Engine FP8 rollout: its fallback to `fp8`, and its wiring against a fake TE.

No TE is installed on the CPU (or GPU) images: a minimal fake `transformer_engine` (exact fp32
GEMM, recorded calls) checks which Linears route through `te.Linear`, with which Parameters,
under how many autocast entries. Real TE numerics are covered only by the cuda test, which skips
unless TE imports."""

import enum
import logging
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import soar_fast as sf
from soar_fast.config.errors import ConfigError
from soar_fast.config.fast import FastConfig
from soar_fast.fast import RolloutEngine, te_fp8
from soar_fast.fast.fp8 import Fp8RolloutLinear, _eligible
from soar_fast.loss.cond import broadcast_uncond
from soar_fast.models import SD3VelocityFn, build_sd3_transformer


def _setup(batch=2, size=(5, 7), device="cpu"):
    model = build_sd3_transformer("tiny", seed=0).to(device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, *size, generator=g).to(device)
    s = torch.rand(batch, generator=g).to(device)
    cond = (torch.randn(batch, 5, 32, generator=g).to(device), torch.randn(batch, 64, generator=g).to(device))
    ub = broadcast_uncond((torch.zeros(5, 32, device=device), torch.zeros(64, device=device)), cond, batch)
    return model, SD3VelocityFn(model), (z, s, ub, cond)


def _engine_logs(caplog):
    return [r for r in caplog.records if r.name == "soar_fast.fast.rollout" and r.levelno >= logging.WARNING]


def test_config_accepts_te_fp8_and_rejects_unknown_modes():
    assert FastConfig(rollout="te_fp8").rollout == "te_fp8"
    with pytest.raises(ConfigError, match="te_fp8"):
        FastConfig(rollout="te_fp9")


def test_te_fp8_falls_back_to_fp8_with_one_log_line(caplog):
    assert not te_fp8.te_available()  # CPU image: no TE
    model, vf, args = _setup()
    fp8 = [t.clone() for t in RolloutEngine(vf, model, "fp8")(*args)]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        engine = RolloutEngine(vf, model, "te_fp8")
    logs = _engine_logs(caplog)
    assert engine.mode == "fp8" and len(logs) == 1
    assert "transformer_engine" in logs[0].getMessage() and "pip install" in logs[0].getMessage()
    out = engine(*args)
    assert all(torch.equal(a, b) for a, b in zip(out, fp8))


class _Fake:
    """A minimal `transformer_engine` (the names the rollout uses), recording what it is asked."""

    def __init__(self, api: str, current_scaling: bool = True):
        self.enters = self.exits = self.depth = 0
        self.calls: dict[int, int] = {}
        self.recipes: list = []
        fake = self

        class Format(enum.Enum):
            E4M3 = "e4m3"
            HYBRID = "hybrid"

        @dataclass
        class DelayedScaling:
            fp8_format: Format = Format.HYBRID

        @dataclass
        class Float8CurrentScaling:
            fp8_format: Format = Format.HYBRID

        class Linear(nn.Module):
            def __init__(self, in_features, out_features, bias=True, params_dtype=None, device="cuda"):
                super().__init__()
                self.use_bias = bias
                self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
                self.bias = nn.Parameter(torch.empty(out_features, dtype=params_dtype, device=device)) if bias else None

            def forward(self, inp):
                assert fake.depth == 1, "te.Linear called outside the autocast"
                assert inp.dim() == 2 and inp.shape[0] % 8 == 0 and inp.shape[1] % 16 == 0  # TE's FP8 shape rule
                fake.calls[id(self)] = fake.calls.get(id(self), 0) + 1
                b = self.bias.float() if self.use_bias else None
                return F.linear(inp.float(), self.weight.float(), b).to(inp.dtype)

        class _Autocast:
            def __init__(self, recipe):
                fake.recipes.append(recipe)

            def __enter__(self):
                fake.enters, fake.depth = fake.enters + 1, fake.depth + 1

            def __exit__(self, *exc):
                fake.exits, fake.depth = fake.exits + 1, fake.depth - 1

        recipe = types.ModuleType("transformer_engine.common.recipe")
        recipe.Format, recipe.DelayedScaling = Format, DelayedScaling
        if current_scaling:
            recipe.Float8CurrentScaling = Float8CurrentScaling
        pt = types.ModuleType("transformer_engine.pytorch")
        pt.Linear = Linear
        pt.fp8_autocast = lambda enabled=True, calibrating=False, fp8_recipe=None, fp8_group=None: _Autocast(fp8_recipe)
        if api == "autocast":  # TE >= 2.9 has both; the new name must win
            pt.autocast = lambda enabled=True, calibrating=False, recipe=None, amax_reduction_group=None: _Autocast(recipe)
            pt.fp8_autocast = None
        common = types.ModuleType("transformer_engine.common")
        common.recipe = recipe
        root = types.ModuleType("transformer_engine")
        root.pytorch, root.common = pt, common
        self.modules = {"transformer_engine": root, "transformer_engine.pytorch": pt,
                        "transformer_engine.common": common, "transformer_engine.common.recipe": recipe}


@pytest.fixture
def fake_te(monkeypatch):
    def install(api="fp8_autocast", current_scaling=True) -> _Fake:
        fake = _Fake(api, current_scaling)
        for name, mod in fake.modules.items():
            monkeypatch.setitem(sys.modules, name, mod)
        monkeypatch.setattr(te_fp8, "has_scaled_mm", lambda device: True)  # pretend an SM 8.9+ GPU
        return fake

    return install


@pytest.mark.parametrize("api", ["fp8_autocast", "autocast"])
def test_te_fp8_wiring_with_a_fake_te(fake_te, api, caplog):
    fake = fake_te(api)
    model, vf, args = _setup()
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    eager = [t.clone() for t in RolloutEngine(vf, model, "eager")(*args)]
    caplog.clear()
    engine = RolloutEngine(vf, model, "te_fp8")
    assert engine.mode == "te_fp8" and not _engine_logs(caplog)
    eligible = [m for n, m in model.named_modules() if _eligible(n, m)]
    assert eligible and list(engine.te.layers) == eligible  # exactly the eligible Linears, all of them
    assert fake.recipes == [] and engine.te.recipe.fp8_format.name == "E4M3"

    out = engine(*args)
    assert (fake.enters, fake.exits) == (1, 1) and fake.depth == 0  # one autocast per rollout
    assert fake.recipes == [engine.te.recipe]
    for m, twin in engine.te.layers.items():
        assert twin.weight is m.weight and twin.bias is m.bias  # the live Parameters, not copies
        assert fake.calls[id(twin)] >= 1 and "forward" not in vars(m)  # routed, then restored
    torch.testing.assert_close(out, tuple(eager), rtol=1e-6, atol=1e-6)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params  # no submodule added

    with torch.no_grad():  # an optimizer step updates the weights in place
        for p in model.parameters():
            p.mul_(1.5)
    out = [t.clone() for t in engine(*args)]
    assert (fake.enters, fake.exits) == (2, 2)
    fresh = RolloutEngine(vf, model, "eager")(*args)
    torch.testing.assert_close(tuple(out), fresh, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[1], eager[1])
    assert list(model.state_dict()) == keys


def test_te_fp8_after_an_fp8_engine_on_the_same_model(fake_te):
    """The benchmark runs every mode on one model: `fp8` class-swaps the Linears first."""
    fake_te()
    model, vf, args = _setup()
    assert RolloutEngine(vf, model, "fp8").mode == "fp8"
    n = sum(type(m) is Fp8RolloutLinear for m in model.modules())
    engine = RolloutEngine(vf, model, "te_fp8")
    assert engine.mode == "te_fp8" and len(engine.te.layers) == n > 0
    torch.testing.assert_close(engine(*args), RolloutEngine(vf, model, "eager")(*args), rtol=1e-6, atol=1e-6)


def test_te_without_current_scaling_falls_back(fake_te, caplog):
    fake_te(current_scaling=False)
    model, vf, args = _setup()
    caplog.clear()
    engine = RolloutEngine(vf, model, "te_fp8")
    logs = _engine_logs(caplog)
    assert engine.mode == "fp8" and len(logs) == 1 and "Float8CurrentScaling" in logs[0].getMessage()


@pytest.mark.cuda
def test_te_fp8_vcfg_error_on_gpu():
    if not te_fp8.te_available() or te_fp8.te_unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip("needs Transformer Engine >= 2.2 on an SM 8.9+ GPU")
    model, vf, args = _setup(batch=4, size=(8, 8), device="cuda")
    eager_u, eager_c = RolloutEngine(vf, model, "eager")(*args)
    engine = RolloutEngine(vf, model, "te_fp8")
    assert engine.mode == "te_fp8"
    v_u, v_c = engine(*args)
    gs = sf.SoarConfig().guidance_scale
    ref, got = eager_u + gs * (eager_c - eager_u), v_u + gs * (v_c - v_u)
    assert ((got - ref).norm() / ref.norm()).item() <= 3e-2
