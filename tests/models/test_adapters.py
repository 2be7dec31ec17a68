"""SD3 and Flux adapters: the real diffusers MMDiT code as a SOAR velocity_fn, on tiny configs."""

import pytest
import torch

import soar_fast as sf
from soar_fast.models import (
    FluxVelocityFn,
    SD3VelocityFn,
    build_flux_transformer,
    build_sd3_transformer,
    sd3_config,
)
from soar_fast.models.flux import pack_latents, unpack_latents


def tiny_sd3_cond(b, seq=3):
    return (torch.randn(b, seq, 32), torch.randn(b, 64)), (torch.zeros(seq, 32), torch.zeros(64))


@pytest.mark.parametrize("shape", [(1, 4, 5, 7), (3, 4, 8, 8)], ids=["batch1-odd5x7", "b3-8x8"])
def test_sd3_adapter_soar_forward_backward(shape):
    model = build_sd3_transformer("tiny")
    cond, uncond = tiny_sd3_cond(shape[0])
    out = sf.soar_loss(SD3VelocityFn(model), torch.randn(shape), cond, uncond, sf.SoarConfig(num_aux=2),
                       torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_sd3_adapter_passes_timestep_1000_sigma_and_conditions():
    model = build_sd3_transformer("tiny")
    seen = {}
    orig = model.forward

    def spy(**kw):
        seen.update(kw)
        return orig(**kw)

    model.forward = spy
    (pe, pooled), _ = tiny_sd3_cond(2)
    sigma = torch.tensor([0.25, 0.9])
    v = SD3VelocityFn(model)(torch.randn(2, 4, 6, 6), sigma, (pe, pooled))
    assert v.shape == (2, 4, 6, 6)
    torch.testing.assert_close(seen["timestep"], 1000 * sigma)
    assert seen["encoder_hidden_states"] is not None and torch.equal(seen["pooled_projections"], pooled)


def test_sd3_adapter_bf16_model_casts_inputs():
    model = build_sd3_transformer("tiny").to(torch.bfloat16)
    (pe, pooled), _ = tiny_sd3_cond(1)
    v = SD3VelocityFn(model)(torch.randn(1, 4, 4, 4), torch.tensor([0.5]), (pe, pooled))
    assert v.dtype == torch.bfloat16


def test_presets_and_unknown_preset():
    assert sd3_config("sd35-medium")["num_layers"] == 24
    assert sd3_config("tiny", num_layers=2)["num_layers"] == 2
    with pytest.raises(ValueError, match="unknown SD3 preset"):
        sd3_config("sdxl")


def test_flux_pack_unpack_roundtrip():
    z = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(z)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(tokens, 6, 10), z)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))


def test_flux_adapter_soar_forward_backward():
    model = build_flux_transformer("tiny")
    cond = (torch.randn(2, 5, 32), torch.randn(2, 32))
    uncond = (torch.zeros(5, 32), torch.zeros(32))
    out = sf.soar_loss(FluxVelocityFn(model), torch.randn(2, 4, 4, 6), cond, uncond, sf.SoarConfig(num_aux=1),
                       torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
