"""The MFU numerator: our per-layer FLOP formula equals torch's FlopCounterMode on the real model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soar_fast.fast.flops import sd3_forward_flops, soar_step_flops
from soar_fast.models import build_sd3_transformer


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


def test_soar_step_flops_ratio():
    model = build_sd3_transformer("tiny")
    f = sd3_forward_flops(model, 8, 8, 5)
    assert soar_step_flops(model, 4, 6, 8, 8, 5) == 3 * f * 7 * 4 + 2 * 4 * f
    assert soar_step_flops(model, 4, 0, 8, 8, 5) == 3 * f * 4
