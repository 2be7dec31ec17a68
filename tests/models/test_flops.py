"""The MFU numerator: our per-layer FLOP formula equals torch's FlopCounterMode on the real model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soar_fast.models import FluxVelocityFn, build_flux_transformer, build_sd3_transformer
from soar_fast.models.flops import flux_forward_flops, sd3_forward_flops
from soar_fast.models.spec import FAMILIES


@pytest.mark.parametrize(
    "overrides,size,text_len",
    [
        pytest.param(dict(num_layers=2, dual_attention_layers=(0,)), 8, 5, id="dual-attention"),
        pytest.param(dict(patch_size=2), 8, 7, id="patch2"),
        pytest.param(dict(), 5, 3, id="odd-5x5"),
    ],
)
def test_formula_matches_flop_counter(overrides, size, text_len):
    model = build_sd3_transformer("tiny", **overrides)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:  # math SDPA = counted bmm
        model(hidden_states=torch.randn(1, 4, size, size), encoder_hidden_states=torch.randn(1, text_len, 32),
              pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    assert sd3_forward_flops(model, size, size, text_len) == counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides,height,width,text_len",
    [
        pytest.param(dict(num_layers=2, num_single_layers=2), 8, 8, 5, id="2+2-8x8"),
        pytest.param(dict(num_layers=2, num_single_layers=2), 8, 6, 7, id="2+2-8x6"),
        pytest.param(dict(num_layers=1, num_single_layers=3, guidance_embeds=False), 4, 10, 5,
                     id="1+3-4x10-no-guidance"),
    ],
)
def test_flux_formula_matches_flop_counter(overrides, height, width, text_len):
    model = build_flux_transformer("tiny", **overrides)
    velocity = FluxVelocityFn(model)  # the exact forward the trainer runs (packing, ids, guidance)
    c = model.config.in_channels // 4
    z = torch.randn(1, c, height, width)
    cond = (torch.randn(1, text_len, model.config.joint_attention_dim),
            torch.randn(1, model.config.pooled_projection_dim))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:  # math SDPA = counted bmm
        v = velocity(z, torch.tensor([0.5]), cond)
    assert v.shape == z.shape
    assert flux_forward_flops(model, height, width, text_len) == counter.get_total_flops()


def test_step_flops_ratio():
    model = build_sd3_transformer("tiny")
    family = FAMILIES["sd3"]
    f = sd3_forward_flops(model, 8, 8, 5)
    assert family.step_flops(model, 4, 6, 8, 8, 5) == 3 * f * 7 * 4 + 2 * 4 * f
    assert family.step_flops(model, 4, 0, 8, 8, 5) == 3 * f * 4


def test_real_presets_have_the_published_sizes():
    """The real architecture presets against the parameter counts their releases state."""
    from soar_fast.models.spec import preset_table

    n = {(f, p): count for f, p, count, _ in preset_table(["sd3", "flux"])}
    assert 2.2e9 < n[("sd3", "sd35-medium")] < 2.3e9  # "2.5B" with the text-side projections counted by Stability
    assert 8.0e9 < n[("sd3", "sd35-large")] < 8.2e9  # "8B"
    assert 11.8e9 < n[("flux", "flux1-dev")] < 12.0e9  # "12B"
    assert n[("flux", "flux1-schnell")] < n[("flux", "flux1-dev")]  # no guidance embedder
