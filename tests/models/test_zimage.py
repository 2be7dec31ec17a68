"""Z-Image through the one SOAR path: the adapter is ZImagePipeline's own denoising step, the FLOP
formula is FlopCounterMode's count, tiny-zimage trains (full, LoRA, fast step), the exports load
with diffusers, and the parity table holds."""

import json

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soar_fast.models.spec import family_of_folder, get_family


@pytest.fixture(scope="module")
def zimage():
    return get_family("zimage")


def _cond(n: int, text_len: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, text_len, dim), torch.randn(n, 0)


def test_family_spec(zimage):
    model = zimage.build("tiny")
    assert zimage.text_dims(model.config) == (32, 0) and zimage.latent_channels(model.config) == 16
    assert [len(lst) for lst in zimage.block_lists(model)] == [1, 1, 1]  # noise_refiner, context_refiner, layers
    assert zimage.pipeline_cls().__name__ == "ZImagePipeline"
    with torch.device("meta"):  # the real architecture, no weights allocated
        real = zimage.cls()(**zimage.presets["z-image-turbo"])
    assert 6.1e9 < sum(p.numel() for p in real.parameters()) < 6.2e9
    assert len(zimage.blocks(real)) == 2 + 2 + 30


def test_adapter_is_the_pipelines_denoising_step(zimage):
    """ZImagePipeline's loop written out (timestep (1000 - t) / 1000, list inputs with a frame dim,
    the negated output into FlowMatchEulerDiscreteScheduler.step): each Euler step is
    z + (σ_next - σ) · v with v our adapter's z1 - z0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = zimage.build("tiny").eval()
    velocity = zimage.velocity(model)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(3)
    scheduler.set_begin_index(0)
    latents = torch.randn(2, 16, 8, 6)
    prompt_embeds, pooled = _cond(2, 7)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            timestep = (1000 - t.expand(latents.shape[0])) / 1000
            out = model(list(latents.unsqueeze(2).unbind(dim=0)), timestep, list(prompt_embeds.unbind(0)),
                        return_dict=False)[0]
            noise_pred = -torch.stack([o.float() for o in out], dim=0).squeeze(2)
            sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
            v = velocity(latents, sigma.expand(2), (prompt_embeds, pooled))
            torch.testing.assert_close(v, noise_pred, rtol=1e-5, atol=1e-6)
            nxt = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            torch.testing.assert_close(nxt, latents + (sigma_next - sigma) * v, rtol=1e-5, atol=1e-5)
            latents = nxt


def test_a_text_mask_gives_the_pipelines_ragged_prompts(zimage):
    """A zero-padded cache row with its mask (`LatentsDataset`'s third condition tensor) is the
    pipeline's list of each prompt's valid tokens; without the mask the zero rows change v."""
    from soar_fast.data.latents import text_mask

    model = zimage.build("tiny").eval()
    velocity = zimage.velocity(model)
    z, sigma, lengths = torch.randn(2, 16, 8, 8), torch.tensor([0.7, 0.3]), [5, 9]
    rows = [torch.randn(k, 32) for k in lengths]
    padded = torch.zeros(2, 12, 32)
    for i, r in enumerate(rows):
        padded[i, : r.shape[0]] = r
    with torch.no_grad():
        out = model(list(z.unsqueeze(2).unbind(0)), 1 - sigma, rows, return_dict=False)[0]
        want = -torch.stack(out).squeeze(2)
        got = velocity(z, sigma, (padded, torch.zeros(2, 0), text_mask(lengths, 12)))
        unmasked = velocity(z, sigma, (padded, torch.zeros(2, 0)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (unmasked - want).abs().max() > 1e-4


@pytest.mark.parametrize(
    "overrides,height,width,text_len",
    [
        pytest.param(dict(), 8, 8, 5, id="tiny-8x8-pad32"),
        pytest.param(dict(n_layers=2, n_refiner_layers=2), 8, 12, 40, id="2+2+2-8x12-text40"),
    ],
)
def test_flops_match_flop_counter(zimage, overrides, height, width, text_len):
    model = zimage.build("tiny", **overrides)
    velocity = zimage.velocity(model)  # the exact forward the trainer runs
    z = torch.randn(2, 16, height, width)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:  # math SDPA = counted bmm
        v = velocity(z, torch.tensor([0.3, 0.8]), _cond(2, text_len))
    assert v.shape == z.shape
    assert 2 * zimage.forward_flops(model, height, width, text_len) == counter.get_total_flops()


def _probe(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    z, cond = torch.randn(1, 16, 8, 8, generator=g), (torch.randn(1, 5, 32, generator=g), torch.zeros(1, 0))
    with torch.no_grad():
        return get_family("zimage").velocity(model)(z, torch.tensor([0.5]), cond)


@pytest.mark.parametrize("extra", [pytest.param([], id="full"), pytest.param(["--model.lora_rank", "4"], id="lora"),
                                   pytest.param(["--runtime.step", "fast"], id="fast-step")])
def test_tiny_zimage_trains_and_exports(zimage, tmp_path, extra):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from safetensors.torch import load_file

    from soar_fast.cli import main

    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny-zimage", "--max_train_steps", "2", "--report_to", "none", *extra,
                 "--output_dir", str(out)]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
    base = zimage.build("tiny", seed=0)
    if "--model.lora_rank" not in extra:
        assert family_of_folder(out / "final", "transformer").name == "zimage"
        trained = ZImageTransformer2DModel.from_pretrained(out / "final" / "transformer")
        assert trained.config.dim == zimage.presets["tiny"]["dim"]
        assert (_probe(trained) - _probe(base)).abs().max() > 1e-5
        return
    # diffusers' Z-Image LoRA loader, without text encoders: the state dict, then into a transformer
    saved = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    state, meta = ZImagePipeline.lora_state_dict(out / "final", return_lora_metadata=True)
    assert state.keys() == saved.keys() and len(state) == 2 * 4 * 3  # A, B x q/k/v/out x 3 blocks
    ZImagePipeline.load_lora_into_transformer(state, transformer=base, metadata=meta)
    loaded = {n: p for n, p in base.named_parameters() if ".lora_" in n}
    assert len(loaded) == len(saved)
    key = "transformer.layers.0.attention.to_q.lora_B.weight"
    torch.testing.assert_close(loaded["layers.0.attention.to_q.lora_B.default_0.weight"], saved[key])
    assert (_probe(base) - _probe(zimage.build("tiny", seed=0))).abs().max() > 1e-6


def test_parity_rows_ok():
    from soar_fast.train.parity import run_parity

    rows = run_parity(preset="tiny", family="zimage", variants=("eager_step", "batched"))
    assert len(rows) == 6 and all(r.status == "ok" for r in rows), [(r.variant, r.metric, r.value) for r in rows]
