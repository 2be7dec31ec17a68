"""FLUX.2 (diffusers `Flux2Transformer2DModel`, pipeline `Flux2Pipeline`) as a SOAR family.

The latent SOAR sees is the transformer's own input grid, `z [N, C, H, W]` with C = in_channels
(128 for FLUX.2-dev): the VAE latent (32 channels) patchified 2x2 and batch-norm normalised, i.e.
exactly the `latents` argument `Flux2Pipeline.__call__` takes. What differs from FLUX.1:

- packing is a plain reshape `[N, C, H, W] -> [N, H*W, C]` (the 2x2 patching happens before, on
  the VAE side, see `latents_from_vae`); the transformer has no patch embedding (patch_size=1);
- position ids have 4 axes (t, h, w, l): image tokens (0, h, w, 0), text tokens (0, 0, 0, l);
  rotary axes (32, 32, 32, 32) split the head dim 128;
- one text encoder (Mistral-3 Small for dev): `prompt_embeds [N, T, 15360]` and no pooled
  embedding, so `text_dims` is (joint_attention_dim, 0) and the adapter ignores the `[N, 0]` pooled
  tensor the data gives;
- the timestep is σ (the pipeline passes `t / 1000`, the model multiplies by 1000); FLUX.2-dev is
  guidance-distilled: `guidance` (Flux2Pipeline's default 4.0) goes into the embedding as is.
  The training passes embed 4.0; the rollout is the distilled-guidance velocity at
  `SoarConfig.guidance_scale` (`rollout_guidance` auto/distilled: one B pass) or, where asked
  (`rollout_guidance=cfg`), true CFG against the empty prompt (docs/families.md);
- the velocity is the same as SD3/FLUX.1: v = dz/dσ = noise - data (FlowMatchEulerDiscreteScheduler
  steps z + (σ' - σ) v), so the loss, targets and aux-state op are unchanged.

Latent normalisation for a cache (`latents_from_vae`): `AutoencoderKLFlux2` latents are patchified
2x2 (`Flux2Pipeline._patchify_latents`) and then normalised per channel with the VAE's batch-norm
statistics, `(x - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)` (no scaling/shift
factor as in FLUX.1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from soar_fast.models.spec import ModelFamily

__all__ = [
    "FLUX2_PRESETS",
    "Flux2VelocityFn",
    "family",
    "flux2_forward_flops",
    "image_ids",
    "latents_from_vae",
    "latents_to_vae",
    "pack_latents",
    "text_ids",
    "unpack_latents",
]

FLUX2_PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' Flux2Transformer2DModel test config (tests/models/transformers/
    # test_models_transformer_flux2.py) with 16 latent channels (4 VAE channels x 2x2 patches).
    "tiny": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    ),
    # the same without the guidance embedding: klein's form (true CFG rollout), for its parity test
    "tiny-klein": dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ),
    # black-forest-labs/FLUX.2-dev transformer/config.json, as diffusers'
    # scripts/convert_flux2_to_diffusers.py writes it (model_type "flux2-dev"; guidance_embeds is
    # the class default True: dev is guidance-distilled). ~32B parameters.
    "flux2-dev": dict(
        patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
        num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
        mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
    ),
    # FLUX.2-klein-4B (same script, model_type "klein-4b"): not guidance-distilled (true CFG), Qwen3
    # text encoder; its diffusers pipeline is Flux2KleinPipeline. ~4B parameters.
    "flux2-klein-4b": dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
        mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
    ),
}

#: LoRA targets: the attention input projections of every block (double: to_q/k/v, single: the
#: fused to_qkv_mlp_proj) and the double-stream output to_out.0 (diffusers' FLUX.2 script default
#: is the first four only, which leaves the 48 single-stream blocks of dev untouched). The
#: single-stream `attn.to_out` cannot be named by suffix: "to_out" also matches the double-stream
#: `attn.to_out` ModuleList, which peft rejects; pass full names via --model.lora_target_modules.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H*W, C], the token layout of Flux2Pipeline._pack_latents."""
    n, c, h, w = z.shape
    return z.reshape(n, c, h * w).permute(0, 2, 1)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [N, H*W, C] -> [N, C, H, W] (Flux2Pipeline._unpack_latents_with_ids
    for the row-major ids of `image_ids`)."""
    n, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(n, c, h, w)


def image_ids(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """[H*W, 4] position ids (t=0, h, w, l=0) of Flux2Pipeline._prepare_latent_ids, one sample."""
    ids = torch.zeros(h, w, 4, dtype=torch.long, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 4)


def text_ids(length: int, device: torch.device | None = None) -> torch.Tensor:
    """[T, 4] position ids (0, 0, 0, l) of Flux2Pipeline._prepare_text_ids, one sample."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


class Flux2VelocityFn:
    """`velocity_fn(z [N, C, H, W], sigma [N], (prompt_embeds [N, T, D], pooled [N, 0])) -> v [N, C, H, W]`,
    the transformer called as Flux2Pipeline calls it in its denoising loop (v = noise - data)."""

    def __init__(self, transformer: nn.Module, guidance: float | None = 4.0):
        self.transformer = transformer
        self.guidance = guidance if transformer.config.guidance_embeds else None

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        prompt_embeds = cond[0]  # cond[1] is the [N, 0] pooled slot: FLUX.2 has no pooled embedding
        dtype = next(self.transformer.parameters()).dtype
        n, _, h, w = z.shape
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, device=z.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(z.to(dtype)),
            encoder_hidden_states=prompt_embeds.to(dtype),
            timestep=sigma.to(dtype),
            img_ids=image_ids(h, w, z.device),
            txt_ids=text_ids(prompt_embeds.shape[1], z.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


def latents_from_vae(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLFlux2` latents [N, c, 2H, 2W] -> the model's normalised latents [N, 4c, H, W]
    (Flux2Pipeline._encode_vae_image after the encoder)."""
    n, c, h2, w2 = latents.shape
    x = latents.view(n, c, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h2 // 2, w2 // 2)
    mean, std = _bn_stats(vae, x)
    return (x - mean) / std


def latents_to_vae(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Inverse of `latents_from_vae`: model latents [N, 4c, H, W] -> VAE latents [N, c, 2H, 2W] for
    `vae.decode` (Flux2Pipeline's decode path)."""
    mean, std = _bn_stats(vae, z)
    x = z * std + mean
    n, c4, h, w = x.shape
    return x.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, h * 2, w * 2)


def _bn_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def _linear_tokens(name: str, n_img: int, n_txt: int) -> int:
    """Tokens one Linear of a Flux2Transformer2DModel sees, from its module name."""
    top = name.split(".")[0]
    if top in ("time_guidance_embed", "double_stream_modulation_img", "double_stream_modulation_txt",
               "single_stream_modulation", "norm_out"):
        return 1  # timestep/guidance embedders and the shared adaLN modulations: per sample
    if top == "single_transformer_blocks":
        return n_img + n_txt  # the fused qkv+mlp and output projections act on text+image
    if top == "context_embedder" or any(s in name for s in ("add_q_proj", "add_k_proj", "add_v_proj",
                                                             "to_add_out", "ff_context.")):
        return n_txt
    return n_img  # x_embedder, proj_out and the double-stream image layers


def flux2_forward_flops(model: nn.Module, height: int, width: int, text_len: int) -> float:
    """FLOPs of one forward of one sample on a height x width latent grid (H*W image tokens, no
    patching in the model) with text_len text tokens:
        F = Σ_linear 2·in·out·T(linear) + (L_double + L_single)·4·N²·d_attn,  N = H·W + T_txt
    with T from `_linear_tokens`; both block kinds attend jointly over all N tokens; norms,
    activations, softmax and rotary embeddings are not GEMM work and are not counted."""
    n_img = height * width
    n = n_img + text_len
    d_attn = model.config.num_attention_heads * model.config.attention_head_dim
    flops = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            flops += 2.0 * mod.in_features * mod.out_features * _linear_tokens(name, n_img, text_len)
    num_blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    return flops + num_blocks * 4.0 * n * n * d_attn


def family() -> ModelFamily:
    return ModelFamily(
        name="flux2", transformer_class="Flux2Transformer2DModel", presets=FLUX2_PRESETS,
        velocity=Flux2VelocityFn, block_attrs=("transformer_blocks", "single_transformer_blocks"),
        forward_flops=flux2_forward_flops, latent_channels=lambda c: c.in_channels,
        pipeline_class="Flux2Pipeline", lora_targets=LORA_TARGETS,
        text_dims=lambda c: (c.joint_attention_dim, 0), guidance_embedding=lambda c: c.guidance_embeds,
    )
