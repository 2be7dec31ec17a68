"""Guidance-distilled families (FLUX.1-dev, FLUX.2-dev): the rollout through the guidance embedding.

`SoarConfig.rollout_guidance`: 'auto' resolves to 'distilled' where the model has a guidance
embedding; the distilled rollout is one B pass of the prompt with `guidance_scale` in the
embedding, and every step implementation (eager, batched, chunked) agrees on it.
"""

from __future__ import annotations

import pytest
import torch

import soar_fast as sf
from soar_fast.config import ConfigError
from soar_fast.fast import RolloutEngine, batched_soar_step
from soar_fast.models.spec import get_family
from soar_fast.train.parity import run_parity


def _inputs(family, model, b=2, size=8, seq=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, family.latent_channels(model.config), size, size, generator=g)
    text_dim, pooled_dim = family.text_dims(model.config)
    cond = (torch.randn(b, seq, text_dim, generator=g), torch.randn(b, pooled_dim, generator=g))
    uncond = (torch.zeros(seq, text_dim), torch.zeros(pooled_dim))
    return z0, cond, uncond


@pytest.mark.parametrize("name,overrides,expected", [
    ("flux", {}, "distilled"), ("flux", {"guidance_embeds": False}, "cfg"),
    ("flux2", {}, "distilled"), ("flux2", {"guidance_embeds": False}, "cfg"), ("sd3", {}, "cfg"),
])
def test_auto_resolves_by_guidance_embedding(name, overrides, expected):
    family = get_family(name)
    model = family.build("tiny", **overrides)
    assert family.rollout_guidance(model, "auto") == expected
    assert family.rollout_guidance(model, "cfg") == "cfg"
    fn = family.rollout_velocity(model, sf.SoarConfig(rollout_guidance="auto", guidance_scale=2.5))
    assert (fn is None) == (expected == "cfg")
    if fn is not None:
        assert fn.guidance == 2.5  # the guidance scale goes into the embedding


def test_distilled_on_a_model_without_embedding_is_one_line():
    family = get_family("sd3")
    with pytest.raises(ConfigError, match="rollout_guidance='distilled'.*cfg") as err:
        family.rollout_guidance(family.build("tiny"), "distilled")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="rollout_guidance"):
        sf.SoarConfig(rollout_guidance="embedded")


@pytest.mark.parametrize("name", ["flux", "flux2"])
def test_distilled_rollout_is_the_guidance_embedding_velocity(name):
    """The eager loss's rollout is v(z_t, σ0, prompt; guidance=g), one B pass: its deviation
    metric is (σ0 − σ1)‖v − (z1 − z0)‖ with v from the adapter at that guidance, and another g
    gives another rollout."""
    family = get_family(name)
    model = family.build("tiny").eval()
    z0, cond, uncond = _inputs(family, model)
    soar = sf.SoarConfig(num_aux=2, guidance_scale=2.0)
    draws = sf.sample_draws(z0, soar, torch.Generator().manual_seed(1))
    calls = []
    base_fn = family.rollout_velocity(model, soar)

    def counted(z, s, c):
        calls.append(z.shape[0])
        return base_fn(z, s, c)

    with torch.no_grad():
        out = sf.soar_loss_from_draws(family.velocity(model), z0, cond, uncond, soar, draws, rollout_fn=counted)
        s0 = draws.sigma0.view(-1, 1, 1, 1)
        z_t = (1 - s0) * z0 + s0 * draws.z1
        v = family.velocity(model, guidance=2.0)(z_t, draws.sigma0, cond)
        want = ((draws.sigma0 - draws.sigma1) * (v - (draws.z1 - z0)).flatten(1).norm(dim=1)).mean()
        other = family.velocity(model, guidance=6.0)(z_t, draws.sigma0, cond)
    assert calls == [z0.shape[0]]  # B rows, no unconditional branch
    torch.testing.assert_close(out.stats["rollout_deviation"], want, rtol=1e-5, atol=1e-6)
    assert (other - v).abs().max() > 1e-4  # the embedding takes the scale: g changes the rollout


def test_batched_step_and_engine_match_the_eager_distilled_loss():
    family = get_family("flux")
    model = family.build("tiny")
    z0, cond, uncond = _inputs(family, model)
    soar = sf.SoarConfig(num_aux=2, guidance_scale=3.5)
    draws = sf.sample_draws(z0, soar, torch.Generator().manual_seed(2))
    rollout_fn = family.rollout_velocity(model, soar)
    ref = sf.soar_loss_from_draws(family.velocity(model), z0, cond, uncond, soar, draws, rollout_fn=rollout_fn)
    engine = RolloutEngine(rollout_fn, model, distilled=True)
    got = batched_soar_step(family.velocity(model), z0, cond, uncond, soar, draws, rollout=engine,
                            ops_backend="reference", backward=False)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-7)
    cfg_out = sf.soar_loss_from_draws(family.velocity(model), z0, cond, uncond, soar, draws)
    assert (cfg_out.loss - ref.loss).abs() > 1e-7  # true CFG against the empty prompt is another rollout


def test_parity_and_describe_record_the_distilled_rollout():
    rows = run_parity("tiny", 2, 2, 8, variants=("eager_step", "batched", "batched_chunked"), family="flux")
    assert rows and all(r.status == "ok" for r in rows), [(r.variant, r.metric, r.value) for r in rows]
    assert {r.config["rollout_guidance"] for r in rows} == {"distilled"}
    rows = run_parity("tiny", 2, 2, 8, variants=("batched",), family="flux", soar={"rollout_guidance": "cfg"})
    assert all(r.status == "ok" for r in rows) and rows[0].config["rollout_guidance"] == "cfg"


def test_step_flops_count_one_rollout_pass_when_distilled():
    family = get_family("flux")
    model = family.build("tiny", device="meta", seed=None)
    f = family.forward_flops(model, 8, 8, 5)
    cfg = family.step_flops(model, 2, 3, 8, 8, 5)
    distilled = family.step_flops(model, 2, 3, 8, 8, 5, rollout_rows=1)
    assert cfg - distilled == pytest.approx(2 * f)
