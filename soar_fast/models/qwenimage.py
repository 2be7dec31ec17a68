"""Qwen-Image (diffusers `QwenImageTransformer2DModel`, pipeline `QwenImagePipeline`) as a SOAR
`velocity_fn`, its FLOP formula and its family spec.

What differs from SD3 (and is handled here), read off diffusers' QwenImagePipeline.__call__:
- Latents are packed into 2x2 patches `[N, C, H, W] -> [N, (H/2)(W/2), 4C]` exactly as Flux's
  (`QwenImagePipeline._pack_latents` is Flux's layout on a 1-frame `[N, 1, C, H, W]` latent), so
  `in_channels = 4C`. Positions are not ids but `img_shapes = [[(1, H/2, W/2)]] * N` (frame,
  height, width of the packed grid), from which the model builds its centred 3-axis RoPE; text
  tokens take the RoPE positions after the image's.
- The timestep is σ itself: the pipeline passes `scheduler.timesteps / 1000` and the model's
  `Timesteps(scale=1000)` scales it back.
- Text: Qwen2.5-VL hidden states `[N, T, 3584]` and an `encoder_hidden_states_mask [N, T]`; there
  is no pooled embedding, so `text_dims` is `(joint_attention_dim, 0)` and the data's pooled
  tensor `[N, 0]` is ignored. `QwenImagePipeline.encode_prompt` drops a mask that is all ones
  (passes None), and so does this adapter for embeddings that are all valid (synthetic ones, or a
  cache of unpadded prompts); a cache of padded prompts carries the real mask as a third element
  of the condition, `(prompt_embeds, pooled, mask [N, T])` (`LatentsDataset`: 1.0 on a prompt's
  valid tokens), passed through as `mask > 0`. Masked attention is exact: a pad key gets no
  weight and text RoPE positions do not depend on the padded length, so a prompt padded to the
  cache's L gives the pipeline's velocity (which pads to the batch's longest prompt).
- Qwen-Image is not guidance-distilled (`guidance_embeds=False`; the model cannot take a guidance
  embedding), so SOAR's rollout uses true CFG against the empty-prompt condition, as for SD3.
  QwenImagePipeline's own true CFG also rescales the guided prediction to the norm of the
  conditional one (per token); SOAR's rollout is the plain CFG combination.
- The flow direction is SD3's: FlowMatchEulerDiscreteScheduler steps `z + (σ' - σ) v`, so the model
  predicts v = z1 - z0 (noise minus data), SOAR's convention; loss, targets and aux-state op are
  unchanged.
- VAE (`AutoencoderKLQwenImage`, a 16-channel causal video VAE, 8x spatial; an image is one frame
  `[B, 3, 1, H, W]`): latents are normalised per channel, `z = (vae.encode(x).latent_dist - mean) /
  std` with `vae.config.latents_mean` / `latents_std` (16 values each), and decoded as
  `z * std + mean` (the pipeline's `latents / (1 / std) + mean`); there is no scaling/shift factor.
  `latents_from_vae` / `latents_to_vae` (used by `soar-fast cache`) are exactly the pipelines' forms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from soar_fast.models import wan
from soar_fast.models.flux import pack_latents, unpack_latents

__all__ = ["QWENIMAGE_PRESETS", "QwenImageVelocityFn", "family", "img_shapes", "latents_from_vae", "latents_to_vae",
           "qwenimage_forward_flops"]

QWENIMAGE_PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' own QwenImageTransformer2DModel test config (tests/models/transformers/
    # test_models_transformer_qwenimage.py), one block: head dim 16 = sum(axes_dims_rope),
    # in_channels 16 = 4 x 4 latent channels packed 2x2 (out_channels 4: proj_out gives 2*2*4).
    "tiny": dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ),
    # Qwen/Qwen-Image transformer/config.json (huggingface.co/Qwen/Qwen-Image, diffusers 0.34;
    # equal to the class defaults): 60 dual-stream blocks, 24 x 128 = 3072 wide, ~20.4B parameters;
    # Qwen2.5-VL-7B text states (3584), 16-channel VAE latents.
    "qwen-image": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    ),
}


def img_shapes(n: int, h: int, w: int) -> list[list[tuple[int, int, int]]]:
    """The `img_shapes` QwenImagePipeline passes for n latents of (unpacked) size h x w: one
    (frame, H/2, W/2) grid per sample."""
    return [[(1, h // 2, w // 2)]] * n


class QwenImageVelocityFn:
    """`velocity_fn(z [N, C, H, W], sigma [N], (prompt_embeds [N, T, D], pooled [N, 0][, mask [N, T]]))
    -> v [N, C, H, W]`: one QwenImagePipeline transformer call (the conditional branch)."""

    def __init__(self, transformer: nn.Module):
        cfg = transformer.config
        if cfg.patch_size != 2 or cfg.in_channels != 4 * cfg.out_channels:
            raise ValueError(f"QwenImagePipeline packs latents 2x2: need patch_size=2 and in_channels = 4 x "
                             f"out_channels, got patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
                             f"out_channels={cfg.out_channels}")
        self.transformer = transformer

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        prompt_embeds = cond[0]  # cond[1], the pooled [N, 0], has no counterpart in Qwen-Image
        # None = every text token valid (the pipeline's all-ones case); a cache's mask is 1.0 / 0.0 floats
        mask = cond[2] > 0 if len(cond) > 2 else None
        dtype = next(self.transformer.parameters()).dtype
        n, _, h, w = z.shape
        if h % 2 or w % 2:
            raise ValueError(f"Qwen-Image latents need even height and width, got {h}x{w}")
        out = self.transformer(
            hidden_states=pack_latents(z.to(dtype)),
            timestep=sigma.to(dtype),
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=prompt_embeds.to(dtype),
            img_shapes=img_shapes(n, h, w),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


def latents_from_vae(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLQwenImage` latents of one frame `[N, C, 1, H, W]` -> the model's normalised
    latents `[N, C, H, W]`: `(x - mean) * (1 / std)` per channel (QwenImageImg2ImgPipeline._encode_vae_image;
    the VAE is Wan's, so is the normalisation: `soar_fast.models.wan.latents_from_vae`)."""
    return wan.latents_from_vae(vae, latents)[:, :, 0]


def latents_to_vae(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Inverse of `latents_from_vae`: `[N, C, H, W]` -> `[N, C, 1, H, W]` for `vae.decode`
    (QwenImagePipeline's `latents / latents_std + latents_mean` with its latents_std = 1 / std)."""
    return wan.latents_to_vae(vae, z.unsqueeze(2))


def _tokens(name: str, n_img: int, n_txt: int) -> int:
    """Tokens one Linear of a QwenImageTransformer2DModel sees, from its module name."""
    parts = name.split(".")
    if parts[0] in ("time_text_embed", "norm_out") or (len(parts) > 2 and parts[2] in ("img_mod", "txt_mod")):
        return 1  # timestep embedder, the per-block adaLN modulations, norm_out.linear
    if parts[0] == "txt_in" or (len(parts) > 2 and parts[2] == "txt_mlp") or \
            parts[-1] in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        return n_txt
    return n_img  # img_in, proj_out, the image-stream attention projections and img_mlp


def qwenimage_forward_flops(model: nn.Module, latent_h: int, latent_w: int, text_len: int) -> float:
    """FLOPs of one forward of one sample whose unpacked latent is latent_h x latent_w (packed
    into (H/2)(W/2) image tokens) with text_len text tokens.

        F = Σ_linear 2·in·out·T(linear)  +  L·4·N²·d_attn
    with N_img = (H/2)(W/2), N = N_img + N_txt, d_attn = heads·head_dim and T = N_img (img_in,
    proj_out, attn.to_q/k/v, attn.to_out.0, img_mlp.*), N_txt (txt_in, attn.add_{q,k,v}_proj,
    attn.to_add_out, txt_mlp.*) or 1 (time_text_embed.*, img_mod/txt_mod, norm_out.linear). Every
    block attends jointly over all N tokens (4·N²·d: QKᵀ plus PV). Norms, RoPE and activations
    are not GEMM work and are not counted (as in models/flops.py). Qwen-Image only: the Edit
    variants' `zero_cond_t` doubles the modulation rows and is not modelled.
    """
    cfg = model.config
    n_img = (latent_h // 2) * (latent_w // 2)
    n = n_img + text_len
    d_attn = cfg.num_attention_heads * cfg.attention_head_dim
    flops = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            flops += 2.0 * mod.in_features * mod.out_features * _tokens(name, n_img, text_len)
    return flops + len(model.transformer_blocks) * 4.0 * n * n * d_attn


def family():  # -> ModelFamily (imported here: spec.py imports this module when registering)
    """The Qwen-Image family spec (registered by soar_fast.models.spec when this module exists)."""
    from soar_fast.models.spec import ModelFamily

    return ModelFamily(
        name="qwenimage", transformer_class="QwenImageTransformer2DModel", presets=QWENIMAGE_PRESETS,
        velocity=QwenImageVelocityFn, block_attrs=("transformer_blocks",),
        forward_flops=qwenimage_forward_flops, latent_channels=lambda c: c.in_channels // 4,
        pipeline_class="QwenImagePipeline",
        # the image-stream attention projections: diffusers' train_dreambooth_lora_qwen_image.py default
        lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
        text_dims=lambda c: (c.joint_attention_dim, 0),
    )
