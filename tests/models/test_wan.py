"""Wan 2.1 / 2.2 video through the one SOAR path: the adapter is WanPipeline's denoising step (one
expert and two), the FLOP formula is FlopCounterMode's count, tiny-wan trains on [B, C, F, H, W]
latents (full, LoRA, fast step), the exports load with diffusers, the parity table holds, the
two-expert router sends each row to its expert, and image/video latent mix-ups are one line."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import soar_fast as sf
from soar_fast.cli import main
from soar_fast.models.spec import family_of, family_of_folder, get_family
from soar_fast.models.wan import WanExperts, WanExpertsVelocityFn, wan_forward_flops

FAMILY = get_family("wan")


def _inputs(n=2, frames=2, h=8, w=6, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, frames, h, w, generator=g), (torch.randn(n, t, 16, generator=g), torch.zeros(n, 0))


def _pipeline(transformer, transformer_2=None, boundary_ratio=None):
    """WanPipeline without VAE or text encoder: prompt embeddings and latents in, latents out."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _euler_cfg(velocity, z, pe, neg, sigmas, g):
    """Euler on SOAR's CFG velocity u + g (c - u), one batched call per step (uncond rows first)."""
    n = z.shape[0]
    for i in range(len(sigmas) - 1):
        u, c = velocity(torch.cat([z, z]), sigmas[i].expand(2 * n), (torch.cat([neg, pe]), torch.zeros(2 * n, 0))).chunk(2)
        z = z + (sigmas[i + 1] - sigmas[i]) * (u + g * (c - u))
    return z


def test_family_spec():
    model = FAMILY.build("tiny")
    assert family_of(model) is FAMILY and FAMILY.pipeline_cls() is WanPipeline
    assert FAMILY.text_dims(model.config) == (16, 0) and FAMILY.latent_channels(model.config) == 4
    assert [len(b) for b in FAMILY.block_lists(model)] == [2]
    counts = {p: sum(x.numel() for x in FAMILY.build(p, seed=None, device="meta").parameters())
              for p in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")}
    assert 1.41e9 < counts["wan2.1-t2v-1.3b"] < 1.43e9 and 14.2e9 < counts["wan2.1-t2v-14b"] < 14.4e9


def test_adapter_is_wan_pipelines_denoising_step():
    """One transformer call as WanPipeline makes it (t = 1000σ, no scaling), then the whole pipeline
    (true CFG, 3 Euler steps) equals Euler on SOAR's CFG of our v; UniPC's flow x0 = z - σ v."""
    model = FAMILY.build("tiny").eval()
    velocity = FAMILY.velocity(model)
    z, (pe, pooled) = _inputs()
    neg = torch.randn_like(pe)
    pipe = _pipeline(model)
    with torch.no_grad():
        pipe.scheduler.set_timesteps(3)
        t, sigma = pipe.scheduler.timesteps[1], pipe.scheduler.sigmas[1]
        ref = model(hidden_states=z, timestep=t.expand(2), encoder_hidden_states=pe, return_dict=False)[0]
        torch.testing.assert_close(velocity(z, sigma.expand(2), (pe, pooled)), ref, rtol=0, atol=0)
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=neg, latents=z, height=64, width=48, num_frames=5,
                   num_inference_steps=3, guidance_scale=5.0, output_type="latent").frames
        ours = _euler_cfg(velocity, z, pe, neg, pipe.scheduler.sigmas, 5.0)
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc.set_timesteps(4)
    unipc._step_index = 1
    z0, z1, s = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4), unipc.sigmas[1]
    x0 = unipc.convert_model_output(z1 - z0, sample=(1 - s) * z0 + s * z1)
    torch.testing.assert_close(x0, z0, rtol=1e-5, atol=1e-5)


def test_two_experts_route_as_wan22_pipeline():
    """WanPipeline with transformer_2 and boundary_ratio 0.5 (high expert for t >= 500) equals Euler
    on WanExpertsVelocityFn, whose batched calls split rows at σ = 0.5."""
    high, low = FAMILY.build("tiny", seed=0).eval(), FAMILY.build("tiny", seed=1).eval()
    experts = WanExperts(high, low, boundary=0.5)
    velocity = WanExpertsVelocityFn(experts)
    z, (pe, pooled) = _inputs()
    neg = torch.randn_like(pe)
    with torch.no_grad():
        pipe = _pipeline(high, low, boundary_ratio=0.5)
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=neg, latents=z, height=64, width=48, num_frames=5,
                   num_inference_steps=4, guidance_scale=5.0, output_type="latent").frames
        sigmas = pipe.scheduler.sigmas
        assert (sigmas[:-1] >= 0.5).any() and (sigmas[:-1] < 0.5).any()  # both experts ran
        torch.testing.assert_close(_euler_cfg(velocity, z, pe, neg, sigmas, 5.0), out, rtol=1e-5, atol=1e-5)
        s = torch.tensor([0.9, 0.2])  # one mixed call = each expert on its own row
        mixed = velocity(z, s, (pe, pooled))
        torch.testing.assert_close(mixed[:1], FAMILY.velocity(high)(z[:1], s[:1], (pe[:1], pooled[:1])))
        torch.testing.assert_close(mixed[1:], FAMILY.velocity(low)(z[1:], s[1:], (pe[1:], pooled[1:])))


@pytest.mark.parametrize("train", ["both", "high"])
def test_soar_step_through_two_experts(train):
    """A SOAR loss whose base, rollout and aux rows straddle the boundary: each trained expert gets
    gradient, a frozen one none."""
    experts = WanExperts(FAMILY.build("tiny", seed=0), FAMILY.build("tiny", seed=1), boundary=0.5, train=train)
    z0, cond = _inputs(n=2, h=4, w=4)
    soar = sf.SoarConfig(num_aux=2, rollout_steps=2)
    draws = sf.sample_draws(z0, soar, torch.Generator().manual_seed(0))
    draws.sigma0.copy_(torch.tensor([0.9, 0.3]))  # one row per expert at the base points
    uncond = (torch.zeros(5, 16), torch.zeros(0))
    sf.soar_loss_from_draws(WanExpertsVelocityFn(experts), z0, cond, uncond, soar, draws).loss.backward()
    grads = {n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())
             for n, e in (("high", experts.high), ("low", experts.low))}
    assert grads == {"high": True, "low": train == "both"}


@pytest.mark.parametrize("step,train", [("eager", "both"), ("fast", "low")])
def test_train_step_through_two_experts(tmp_path, step, train):
    """A Wan 2.2 folder's two experts (WanExperts.from_pretrained) through build_train_step: the
    eager and the batched step (Triton ops) route every call by σ and equal the eager loss and
    gradients on the router; a frozen expert is left out of the optimizer."""
    import copy
    import dataclasses

    from soar_fast.config import TrainConfig
    from soar_fast.distributed import init_distributed, unwrap_name
    from soar_fast.models.wan import experts_family
    from soar_fast.train.step import build_train_step

    FAMILY.build("tiny", seed=0).save_pretrained(tmp_path / "transformer")
    FAMILY.build("tiny", seed=1).save_pretrained(tmp_path / "transformer_2")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "boundary_ratio": 0.5, "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    base = WanExperts.from_pretrained(tmp_path, train=train)
    assert base.boundary == 0.5 and all(p.requires_grad == (train == "both") for p in base.high.parameters())
    z0, cond = _inputs(n=2, h=4, w=4)
    uncond = (torch.zeros(5, 16), torch.zeros(0))
    cfg = TrainConfig()
    cfg.runtime = dataclasses.replace(cfg.runtime, step=step, device="cpu")
    if step == "fast":  # the Triton kernels (TRITON_INTERPRET=1 on a CPU) on 5-D latents too
        cfg.fast = dataclasses.replace(cfg.fast, ops_backend="triton")
    cfg.soar = soar = sf.SoarConfig(num_aux=2, rollout_steps=3)
    draws = sf.sample_draws(z0, soar, torch.Generator().manual_seed(0))
    draws.sigma0.copy_(torch.tensor([0.9, 0.3]))
    ref = copy.deepcopy(base)
    ref_loss = sf.soar_loss_from_draws(WanExpertsVelocityFn(ref), z0, cond, uncond, soar, draws).loss
    ref_loss.backward()
    ts = build_train_step(experts_family(), copy.deepcopy(base), cfg, init_distributed(cfg.parallel, "cpu"))
    assert len(ts.params) == sum(p.requires_grad for p in base.parameters())
    loss = ts.micro_step(z0, cond, uncond, draws).loss
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-7)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    grads = {unwrap_name(n): p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in ts.model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any(n.startswith("low.") for n in grads)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)


def test_step_flops_count_every_frame():
    """The step's FLOPs of a video use the frames (3F(1+M)B + 2BF with F = wan_forward_flops of F frames)."""
    model = FAMILY.build("tiny")
    f2 = wan_forward_flops(model, 8, 8, 5, 2)
    assert f2 > wan_forward_flops(model, 8, 8, 5)
    assert FAMILY.step_flops(model, 2, 3, 8, 8, 5, frames=2) == 3 * f2 * 4 * 2 + 2 * 2 * f2


def test_a_bf16_cast_keeps_what_diffusers_keeps_in_fp32(tmp_path):
    """`_to` (the trained model's pure-bf16 cast and the rollout replica's) leaves Wan's
    `_keep_in_fp32_modules` in fp32 as `from_pretrained(torch_dtype=bfloat16)` does: the RoPE
    tables always, the parameters in the (unsharded) replica; the trained model's parameters are
    all bf16 (FSDP2 takes one dtype per unit). Both experts of a WanExperts alike."""
    from soar_fast.train.step import _to

    FAMILY.build("tiny").save_pretrained(tmp_path / "t")
    ref = FAMILY.cls().from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16)
    want = {n: t.dtype for n, t in [*ref.named_parameters(), *ref.named_buffers()]}
    assert want["rope.freqs_cos"] == torch.float32 and want["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    replica = _to(FAMILY.build("tiny"), torch.device("cpu"), torch.bfloat16, keep_fp32_params=True)
    assert {n: t.dtype for n, t in [*replica.named_parameters(), *replica.named_buffers()]} == want
    trained = _to(FAMILY.build("tiny"), torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in trained.named_buffers()} == {n: b.dtype for n, b in ref.named_buffers()}
    experts = _to(WanExperts(FAMILY.build("tiny"), FAMILY.build("tiny"), 0.5), torch.device("cpu"), torch.bfloat16)
    assert experts.high.rope.freqs_cos.dtype == experts.low.rope.freqs_sin.dtype == torch.float32
    assert experts.low.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_the_fp8_rollout_replica_keeps_fp32_modules_and_trains():
    """The FP8 rollout's replica (pure bf16 weights) keeps Wan's fp32 modules; the step runs and the
    refresh after an optimizer step copies bf16 weights into them (the adapter feeds the patch
    embedding's dtype, not the kept-fp32 first parameter's)."""
    import dataclasses

    from soar_fast.config import TrainConfig
    from soar_fast.distributed import init_distributed
    from soar_fast.train.step import build_train_step

    cfg = TrainConfig()
    cfg.runtime = dataclasses.replace(cfg.runtime, step="fast", device="cpu", weight_dtype="bf16")
    cfg.fast = dataclasses.replace(cfg.fast, rollout="fp8")
    cfg.soar = soar = sf.SoarConfig(num_aux=2, rollout_steps=3)
    ts = build_train_step(FAMILY, FAMILY.build("tiny"), cfg, init_distributed(cfg.parallel, "cpu"))
    rep = ts.replica
    assert rep.rope.freqs_cos.dtype == rep.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert rep.scale_shift_table.dtype == torch.float32
    z0, cond = _inputs(n=2, h=4, w=4)
    uncond = (torch.zeros(5, 16), torch.zeros(0))
    loss = ts.micro_step(z0, cond, uncond, sf.sample_draws(z0, soar, torch.Generator().manual_seed(0))).loss
    assert torch.isfinite(loss)
    ts.refresh_rollout()
    assert rep.scale_shift_table.dtype == torch.float32


@pytest.mark.parametrize("overrides,frames,height,width,text_len", [
    pytest.param(dict(), 2, 8, 8, 5, id="2-blocks-2x8x8-text5"),
    pytest.param(dict(num_layers=1, patch_size=(2, 2, 2)), 4, 4, 6, 7, id="1-block-patch222-4x4x6-text7"),
])
def test_wan_formula_matches_flop_counter(overrides, frames, height, width, text_len):
    model = FAMILY.build("tiny", **overrides)
    z, cond = _inputs(n=1, frames=frames, h=height, w=width, t=text_len)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:  # math SDPA = counted bmm
        FAMILY.velocity(model)(z, torch.tensor([0.5]), cond)
    assert wan_forward_flops(model, height, width, text_len, frames) == counter.get_total_flops()
    assert FAMILY.forward_flops is wan_forward_flops


def _probe(model):
    z, cond = _inputs(n=1, h=8, w=8, seed=3)
    with torch.no_grad():
        return FAMILY.velocity(model)(z, torch.tensor([0.5]), cond)


def _sample(pipe):
    """Two latent-space denoising steps of WanPipeline (CFG against a zero negative prompt)."""
    z, (pe, _) = _inputs(n=1, h=8, w=8, seed=4)
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=torch.zeros_like(pe), latents=z, height=64, width=64,
                    num_frames=5, num_inference_steps=2, guidance_scale=4.0, output_type="latent").frames


@pytest.mark.parametrize("extra", [pytest.param([], id="full"), pytest.param(["--model.lora_rank", "4"], id="lora"),
                                   pytest.param(["--runtime.step", "fast"], id="fast-step")])
def test_tiny_wan_trains_and_exports(tmp_path, extra):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny-wan", "--max_train_steps", "2", "--report_to", "none", *extra,
                 "--output_dir", str(out)]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
    base = FAMILY.build("tiny", seed=0)
    if "--model.lora_rank" not in extra:
        assert family_of_folder(out / "final", "transformer") is FAMILY
        trained = WanTransformer3DModel.from_pretrained(out / "final" / "transformer")
        assert tuple(trained.config.patch_size) == (1, 2, 2)
        assert (_probe(trained) - _probe(base)).abs().max() > 1e-5
        assert torch.isfinite(_sample(_pipeline(trained.eval()))).all()
        return
    saved = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    state, meta = WanPipeline.lora_state_dict(out / "final", return_lora_metadata=True)
    assert state.keys() == saved.keys() and len(state) == 2 * 2 * 4 * 2  # A, B x q/k/v/out x attn1/2 x 2 blocks
    WanPipeline.load_lora_into_transformer(state, transformer=base, metadata=meta)
    loaded = {n: p for n, p in base.named_parameters() if ".lora_" in n}
    assert len(loaded) == len(saved)
    torch.testing.assert_close(loaded["blocks.1.attn2.to_k.lora_B.default_0.weight"],
                               saved["transformer.blocks.1.attn2.to_k.lora_B.weight"])
    assert (_probe(base) - _probe(FAMILY.build("tiny", seed=0))).abs().max() > 1e-6
    pipe = _pipeline(FAMILY.build("tiny", seed=0).eval())  # the pipeline's own loader, then sampling
    before = _sample(pipe)
    pipe.load_lora_weights(out / "final")
    after = _sample(pipe)
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_parity_eager_and_batched():
    from soar_fast.train.parity import run_parity

    rows = run_parity(preset="tiny", family="wan", variants=("eager_step", "batched"))
    assert len(rows) == 6 and all(r.status == "ok" for r in rows), [(r.variant, r.metric, r.value) for r in rows]


@pytest.mark.parametrize("recipe,frames,needle", [
    pytest.param("tiny-wan", "0", "set --data.latent_frames", id="images-to-wan"),
    pytest.param("tiny-sd3", "2", "drop --data.latent_frames", id="video-to-sd3"),
])
def test_video_image_mismatch_is_one_line(tmp_path, capsys, recipe, frames, needle):
    rc = main(["train", "--recipe", recipe, "--data.latent_frames", frames, "--report_to", "none",
               "--output_dir", str(tmp_path / "run")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("soar-fast: error:")]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
