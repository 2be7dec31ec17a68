"""FLUX.1 Kontext as a conditioning variant of the flux family: the reference image's latents are the
condition's third tensor. The adapter is FluxKontextPipeline's transformer call (reference tokens
appended with first id axis 1, the output cut to the noisy latent's tokens); CFG keeps each row's
reference (the uncond's part is None); the eager loss, the batched step and the true-CFG rollout
agree on it."""

from __future__ import annotations

import torch

import soar_fast as sf
from soar_fast.fast import RolloutEngine, batched_soar_step
from soar_fast.loss.cond import broadcast_uncond, to_device, where_cond
from soar_fast.models.spec import get_family

FLUX = get_family("flux")


def _inputs(model, b=2, size=8, ref=(6, 10), seq=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = FLUX.latent_channels(model.config)
    text_dim, pooled_dim = FLUX.text_dims(model.config)
    z0 = torch.randn(b, c, size, size, generator=g)
    cond = (torch.randn(b, seq, text_dim, generator=g), torch.randn(b, pooled_dim, generator=g),
            torch.randn(b, c, *ref, generator=g))
    uncond = (torch.zeros(seq, text_dim), torch.zeros(pooled_dim), None)
    return z0, cond, uncond


def test_adapter_is_the_kontext_pipelines_transformer_call():
    from diffusers import FluxKontextPipeline

    model = FLUX.build("tiny").eval()
    z, (pe, pooled, ref), _ = _inputs(model)
    n, c, h, w = z.shape
    sigma = torch.tensor([0.7, 0.2])
    latents = FluxKontextPipeline._pack_latents(z, n, c, h, w)
    image_latents = FluxKontextPipeline._pack_latents(ref, n, c, *ref.shape[2:])
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(n, ref.shape[2] // 2, ref.shape[3] // 2, "cpu",
                                                             torch.float32)
    image_ids[..., 0] = 1
    ids = torch.cat([FluxKontextPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32),
                     image_ids])
    with torch.no_grad():
        want = model(hidden_states=torch.cat([latents, image_latents], dim=1), timestep=sigma,
                     guidance=torch.full((n,), 2.5), pooled_projections=pooled, encoder_hidden_states=pe,
                     txt_ids=torch.zeros(pe.shape[1], 3), img_ids=ids, return_dict=False)[0][:, : latents.shape[1]]
        got = FLUX.velocity(model, guidance=2.5)(z, sigma, (pe, pooled, ref))
        plain = FLUX.velocity(model, guidance=2.5)(z, sigma, (pe, pooled))
    torch.testing.assert_close(FluxKontextPipeline._pack_latents(got, n, c, h, w), want, rtol=1e-5, atol=1e-6)
    assert (got - plain).abs().max() > 1e-4  # the reference tokens change v


def test_cfg_keeps_each_rows_reference():
    model = FLUX.build("tiny")
    z0, cond, uncond = _inputs(model)
    ub = broadcast_uncond(uncond, cond, 2)
    assert ub[2] is cond[2] and ub[0].shape == cond[0].shape and not ub[0].any()
    dropped = where_cond(torch.tensor([True, False]), ub, cond)
    assert dropped[2] is cond[2] and not dropped[0][0].any() and torch.equal(dropped[0][1], cond[0][1])
    assert to_device(uncond, "cpu")[2] is None


def test_eager_batched_and_cfg_rollouts_agree_with_a_reference_image():
    model = FLUX.build("tiny")
    z0, cond, uncond = _inputs(model)
    soar = sf.SoarConfig(num_aux=2, guidance_scale=3.5, cond_dropout=0.5)
    draws = sf.sample_draws(z0, soar, torch.Generator().manual_seed(2))
    rollout_fn = FLUX.rollout_velocity(model, soar)  # distilled (FLUX.1 Kontext [dev] is guidance-distilled)
    ref = sf.soar_loss_from_draws(FLUX.velocity(model), z0, cond, uncond, soar, draws, rollout_fn=rollout_fn)
    got = batched_soar_step(FLUX.velocity(model), z0, cond, uncond, soar, draws,
                            rollout=RolloutEngine(rollout_fn, model, distilled=True), ops_backend="reference",
                            backward=False)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-7)
    cfg = sf.SoarConfig(num_aux=2, guidance_scale=3.5, rollout_guidance="cfg")
    eager = sf.soar_loss_from_draws(FLUX.velocity(model), z0, cond, uncond, cfg, draws)
    batched = batched_soar_step(FLUX.velocity(model), z0, cond, uncond, cfg, draws,
                                rollout=RolloutEngine(FLUX.velocity(model), model), ops_backend="reference",
                                backward=False)
    torch.testing.assert_close(batched.loss, eager.loss, rtol=1e-5, atol=1e-7)
    eager.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
