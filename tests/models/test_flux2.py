"""FLUX.2 through the one SOAR path: the adapter is Flux2Pipeline's transformer call, the FLOP formula
is FlopCounterMode's count, and tiny-flux2 trains, exports and loads back into diffusers."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soar_fast.cli import main
from soar_fast.models.flux2 import (
    Flux2VelocityFn,
    flux2_forward_flops,
    latents_from_vae,
    latents_to_vae,
    pack_latents,
)
from soar_fast.models.spec import family_of, family_of_folder, get_family
from soar_fast.train.parity import run_parity

FAMILY = get_family("flux2")


def _pipeline(transformer):
    """Flux2Pipeline without VAE or text encoder: prompt_embeds and latents in, latents out."""
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                         text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(model, n=2, h=8, w=6, t=5):
    z = torch.randn(n, FAMILY.latent_channels(model.config), h, w)
    text_dim, pooled_dim = FAMILY.text_dims(model.config)
    return z, (torch.randn(n, t, text_dim), torch.zeros(n, pooled_dim))


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev-guidance", "no-guidance"])
def test_velocity_is_flux2_pipeline_transformer_call(guidance_embeds):
    model = FAMILY.build("tiny", guidance_embeds=guidance_embeds).eval()
    z, (pe, pooled) = _inputs(model)
    t = torch.tensor(876.8641)  # a scheduler timestep (σ·1000), as the denoising loop sees it
    with torch.no_grad():  # Flux2Pipeline.__call__, one step of its loop (prepare_latents, encode_prompt)
        ref = model(hidden_states=Flux2Pipeline._pack_latents(z), timestep=t.expand(2) / 1000,
                    guidance=torch.full([1], 4.0).expand(2), encoder_hidden_states=pe,
                    txt_ids=Flux2Pipeline._prepare_text_ids(pe), img_ids=Flux2Pipeline._prepare_latent_ids(z),
                    return_dict=False)[0]
        ref = Flux2Pipeline._unpack_latents_with_ids(ref, Flux2Pipeline._prepare_latent_ids(z))
        v = Flux2VelocityFn(model)(z, t.expand(2) / 1000, (pe, pooled))
    assert v.shape == z.shape
    assert torch.equal(v, ref)


def test_pipeline_sampling_is_euler_on_the_velocity():
    """Flux2Pipeline's scheduler steps z + (σ' - σ)·v with our v: same sign convention as SD3/FLUX.1."""
    model = FAMILY.build("tiny").eval()
    z, cond = _inputs(model)
    pipe = _pipeline(model)
    with torch.no_grad():
        out = pipe(prompt_embeds=cond[0], latents=z, height=128, width=96, num_inference_steps=2,
                   output_type="latent").images
        sigmas, x, velocity = pipe.scheduler.sigmas, z, Flux2VelocityFn(model)
        for i in range(2):
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i].expand(2), cond)
    torch.testing.assert_close(pack_latents(x), out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "overrides,height,width,text_len",
    [
        pytest.param(dict(), 8, 8, 5, id="1+1-8x8"),
        pytest.param(dict(num_layers=2, num_single_layers=2, guidance_embeds=False), 4, 6, 3,
                     id="2+2-4x6-no-guidance"),
    ],
)
def test_flux2_formula_matches_flop_counter(overrides, height, width, text_len):
    model = FAMILY.build("tiny", **overrides)
    z, cond = _inputs(model, n=1, h=height, w=width, t=text_len)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:  # math SDPA = counted bmm
        Flux2VelocityFn(model)(z, torch.tensor([0.5]), cond)
    assert flux2_forward_flops(model, height, width, text_len) == counter.get_total_flops()
    assert FAMILY.forward_flops is flux2_forward_flops


def test_vae_latent_normalisation_is_the_pipelines():
    """latents_from_vae = Flux2Pipeline._encode_vae_image after the encoder; latents_to_vae inverts it."""
    c = 4
    vae = SimpleNamespace(bn=SimpleNamespace(running_mean=torch.randn(4 * c), running_var=torch.rand(4 * c) + 0.5),
                          config=SimpleNamespace(batch_norm_eps=1e-4),
                          encode=lambda x: SimpleNamespace(latents=x))  # an identity "encoder"
    raw = torch.randn(2, c, 8, 12)
    ref = Flux2Pipeline._encode_vae_image(SimpleNamespace(vae=vae, _patchify_latents=Flux2Pipeline._patchify_latents),
                                          raw, generator=None)
    z = latents_from_vae(vae, raw)
    assert z.shape == (2, 4 * c, 4, 6)
    torch.testing.assert_close(z, ref, rtol=0, atol=0)
    torch.testing.assert_close(latents_to_vae(vae, z), raw, rtol=1e-5, atol=1e-5)


def test_family_spec():
    model = FAMILY.build("tiny")
    assert family_of(model) is FAMILY and FAMILY.pipeline_class == "Flux2Pipeline"
    assert FAMILY.text_dims(model.config) == (32, 0) and FAMILY.latent_channels(model.config) == 16
    assert [len(b) for b in FAMILY.block_lists(model)] == [1, 1]
    klein = FAMILY.build("flux2-klein-4b", device="meta", seed=None)
    assert 3.8e9 < sum(p.numel() for p in klein.parameters()) < 3.9e9
    for preset in FAMILY.presets.values():
        assert sum(preset["axes_dims_rope"]) == preset["attention_head_dim"]


def test_train_export_and_load_back_into_diffusers(tmp_path):
    common = ["train", "--recipe", "tiny-flux2", "--max_train_steps", "2", "--report_to", "none"]
    assert main([*common, "--output_dir", str(tmp_path / "full")]) == 0
    folder = tmp_path / "full" / "final" / "transformer"
    assert family_of_folder(folder) is FAMILY
    full = Flux2Transformer2DModel.from_pretrained(folder)
    base = FAMILY.build("tiny", seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), base.state_dict().values()))

    assert main([*common, "--model.lora_rank", "4", "--runtime.step", "fast",
                 "--output_dir", str(tmp_path / "lora")]) == 0
    lora_dir = tmp_path / "lora" / "final"
    state, meta = Flux2Pipeline.lora_state_dict(lora_dir, return_lora_metadata=True)
    kinds = {k.split(".attn.")[1].rsplit(".lora_", 1)[0] for k in state}
    assert kinds == {"to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"}
    assert all(k.startswith("transformer.") for k in state)
    lora_model = FAMILY.build("tiny", seed=0)
    Flux2Pipeline.load_lora_into_transformer(state, transformer=lora_model, metadata=meta)
    b = lora_model.single_transformer_blocks[0].attn.to_qkv_mlp_proj.lora_B["default_0"].weight
    assert b.abs().sum() > 0  # the trained adapter, not the B = 0 init

    pipe = _pipeline(FAMILY.build("tiny", seed=0).eval())  # the pipeline's own loader, then sampling
    z, cond = _inputs(pipe.transformer)
    kw = dict(prompt_embeds=cond[0], latents=z, height=128, width=96, num_inference_steps=2, output_type="latent")
    with torch.no_grad():
        before = pipe(**kw).images
        pipe.load_lora_weights(lora_dir)
        after = pipe(**kw).images
    assert torch.isfinite(after).all() and not torch.equal(before, after)


@pytest.mark.parametrize("preset", ["tiny", "tiny-klein"])  # distilled rollout (dev); true CFG (klein)
def test_parity_eager_and_batched(preset):
    rows = run_parity(preset, family="flux2", variants=("eager_step", "batched"))
    assert rows and all(r.ok for r in rows), [(r.variant, r.metric, r.value) for r in rows]
    assert all(r.config["rollout_guidance"] == ("distilled" if preset == "tiny" else "cfg") for r in rows)
