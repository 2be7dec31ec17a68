"""Qwen-Image through the one SOAR path: the adapter is QwenImagePipeline's transformer call, the
FLOP formula is FlopCounterMode's count, tiny-qwenimage trains (full, LoRA, fast step), the exports
load in diffusers, and the step variants agree with the eager reference."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soar_fast.models.flux import pack_latents
from soar_fast.models.qwenimage import (
    QWENIMAGE_PRESETS,
    QwenImageVelocityFn,
    qwenimage_forward_flops,
)
from soar_fast.models.spec import family_of, get_family


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_family_spec():
    fam = get_family("qwenimage")
    model = fam.build("tiny")
    assert family_of(model) is fam and fam.pipeline_cls().__name__ == "QwenImagePipeline"
    assert fam.latent_channels(model.config) == 4 and fam.text_dims(model.config) == (16, 0)
    assert [len(lst) for lst in fam.block_lists(model)] == [1]
    names = [n for n, _ in model.named_modules()]
    assert all(any(n.endswith(f"attn.{t}") for n in names) for t in fam.lora_targets)
    real = QWENIMAGE_PRESETS["qwen-image"]
    assert sum(real["axes_dims_rope"]) == real["attention_head_dim"] and real["in_channels"] == 4 * real["out_channels"]


def test_adapter_is_one_qwenimage_pipeline_step():
    """A 2-step QwenImagePipeline run (no VAE or text encoder: embeddings in, latents out): its first
    Euler step is z + (σ1 - σ0)·velocity_fn(z, σ0), so the adapter is the pipeline's transformer call
    (packing, img_shapes, timestep σ, no guidance embedding) and v = z1 - z0 has the scheduler's sign.
    The pipeline drops an all-ones mask, as the adapter does; a padded mask is passed through."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    fam = get_family("qwenimage")
    model = fam.build("tiny").eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=model)
    n, c, h, w, t = 2, 4, 8, 6, 5
    z = torch.randn(n, c, h, w)
    pe = torch.randn(n, t, 16)
    seen = {}

    def grab(p, i, ts, kw):
        seen.setdefault(i, kw["latents"].clone())
        return {}

    with torch.no_grad():
        pipe(prompt_embeds=pe, prompt_embeds_mask=torch.ones(n, t, dtype=torch.long), height=8 * h, width=8 * w,
             num_inference_steps=2, sigmas=[0.8, 0.4], latents=pack_latents(z), true_cfg_scale=1.0,
             output_type="latent", callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])
        s0, s1 = pipe.scheduler.sigmas[:2]
        velocity = QwenImageVelocityFn(model)
        v = velocity(z, torch.full((n,), s0.item()), (pe, torch.zeros(n, 0)))
        torch.testing.assert_close(seen[0], pack_latents(z + (s1 - s0) * v), rtol=1e-5, atol=1e-5)

        mask = torch.ones(n, t, dtype=torch.bool)
        mask[0, 3:] = False  # a padded prompt
        want = model(hidden_states=pack_latents(z), timestep=torch.full((n,), 0.5), encoder_hidden_states=pe,
                     encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False)[0]
        got = velocity(z, torch.full((n,), 0.5), (pe, torch.zeros(n, 0), mask))
        torch.testing.assert_close(pack_latents(got), want)
        assert (got - velocity(z, torch.full((n,), 0.5), (pe, torch.zeros(n, 0)))).abs().max() > 1e-4


def test_a_masked_prompt_padded_longer_is_the_unpadded_prompt():
    """The cache pads every prompt to its longest L with zeros; with the mask (`LatentsDataset`'s float
    1.0 / 0.0) the velocity equals the one of the prompt padded only to the batch's longest (what
    QwenImagePipeline feeds), and of a prompt alone without padding."""
    from soar_fast.data.latents import text_mask

    velocity = QwenImageVelocityFn(get_family("qwenimage").build("tiny").eval())
    z, sigma = torch.randn(2, 4, 8, 6), torch.tensor([0.6, 0.2])
    pe = torch.randn(2, 5, 16)
    pe[1, 3:] = 0  # row 1 has 3 valid tokens
    padded = torch.cat([pe, torch.zeros(2, 7, 16)], dim=1)  # the cache's longer L = 12
    with torch.no_grad():
        tight = velocity(z, sigma, (pe, torch.zeros(2, 0), text_mask([5, 3], 5)))
        loose = velocity(z, sigma, (padded, torch.zeros(2, 0), text_mask([5, 3], 12)))
        alone = velocity(z[1:], sigma[1:], (pe[1:, :3], torch.zeros(1, 0)))
    torch.testing.assert_close(loose, tight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loose[1:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers,height,width,text_len", [
    pytest.param(2, 8, 8, 5, id="2-blocks-8x8"),
    pytest.param(1, 6, 10, 7, id="1-block-6x10"),
])
def test_flops_match_flop_counter(layers, height, width, text_len):
    model = get_family("qwenimage").build("tiny", num_layers=layers)
    z = torch.randn(1, 4, height, width)
    cond = (torch.randn(1, text_len, 16), torch.randn(1, 0))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:  # math SDPA = counted bmm
        QwenImageVelocityFn(model)(z, torch.tensor([0.5]), cond)
    assert qwenimage_forward_flops(model, height, width, text_len) == counter.get_total_flops()


def test_tiny_qwenimage_trains_and_exports(tmp_path):
    """`soar-fast train --recipe tiny-qwenimage`: full (eager and fast step) and LoRA; the full export
    loads as QwenImageTransformer2DModel, the LoRA through diffusers' QwenImage LoRA loader."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from soar_fast.cli import main

    common = ["train", "--recipe", "tiny-qwenimage", "--max_train_steps", "2", "--report_to", "none",
              "--checkpointing_steps", "0"]
    fam = get_family("qwenimage")
    base = fam.build("tiny", seed=0)
    z, pe = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)

    def probe(m):
        with torch.no_grad():
            return QwenImageVelocityFn(m)(z, torch.tensor([0.6]), (pe, torch.zeros(1, 0)))

    for step in ("eager", "fast"):
        out = tmp_path / f"full-{step}"
        assert main([*common, "--runtime.step", step, "--output_dir", str(out)]) == 0
        trained = QwenImageTransformer2DModel.from_pretrained(out / "final" / "transformer")
        assert trained.config.num_layers == QWENIMAGE_PRESETS["tiny"]["num_layers"]
        assert (probe(trained) - probe(base)).abs().max() > 1e-5

    out = tmp_path / "lora"
    assert main([*common, "--model.lora_rank", "4", "--output_dir", str(out)]) == 0
    state = QwenImagePipeline.lora_state_dict(out / "final" / "pytorch_lora_weights.safetensors")
    assert state and all(k.startswith("transformer.") and "lora" in k for k in state)
    target = fam.build("tiny", seed=0)
    QwenImagePipeline.load_lora_into_transformer(state, transformer=target, adapter_name="soar")
    params = dict(target.named_parameters())
    for key, saved in state.items():  # every exported tensor lands on its module, unchanged
        torch.testing.assert_close(params[key.removeprefix("transformer.").replace(".weight", ".soar.weight")], saved)
    assert {k.split(".")[-3] for k in state} >= {"to_q", "to_k", "to_v"}
    assert (probe(target) - probe(base)).abs().max() > 1e-6  # the trained adapters act


def test_parity_eager_and_batched():
    from soar_fast.train.parity import run_parity

    rows = run_parity(preset="tiny", family="qwenimage", variants=("eager_step", "batched"))
    assert rows and all(r.status == "ok" for r in rows), [(r.variant, r.metric, r.value) for r in rows]
