"""Z-Image (diffusers `ZImageTransformer2DModel`, pipeline `ZImagePipeline`) as a SOAR `velocity_fn`.

What differs from SD3 (and is handled here):
- The forward takes lists of per-sample tensors: latents `[C, F, H, W]` (F = 1 frame for images)
  and caption features `[T, D]`; the output is a list of `[C, F, H, W]`. The adapter makes one
  call with N list entries and stacks the result.
- Time runs the other way: ZImagePipeline passes `t = (1000 - 1000σ) / 1000 = 1 - σ` (the model
  scales it by `t_scale` = 1000), so t = 1 is clean data and t = 0 pure noise.
- The model predicts data minus noise; the pipeline negates its output before the Euler step of
  `FlowMatchEulerDiscreteScheduler`, which takes noise minus data. So SOAR's v = z1 - z0 is
  `-model(...)`, and the loss, targets and aux-state op are unchanged.
- No pooled embedding: `text_dims` is (cap_feat_dim, 0); the data's pooled tensor of width 0 is
  ignored. No guidance embedding (Turbo is DMD-distilled; its docs sample with guidance 0).
- Patchify is 2x2 inside the model; image and caption tokens are each padded (inside the model)
  to a multiple of `SEQ_MULTI_OF` = 32 with a learned pad token that is not masked out, so those
  pad tokens are real compute: `zimage_forward_flops` counts them.
- Blocks: `noise_refiner` (image tokens, modulated), `context_refiner` (caption tokens, no
  modulation), then `layers` over the image+caption concatenation; all `ZImageTransformerBlock`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from soar_fast.models.spec import ModelFamily

__all__ = ["ZIMAGE_PRESETS", "ZImageVelocityFn", "family", "zimage_forward_flops"]

# One config for Turbo and base: Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image,
# transformer/config.json on the Hugging Face Hub (diffusers' defaults but axes_lens[0] = 1536;
# the base checkpoint adds siglip_feat_dim=null, the same module). ~6.15B parameters.
_Z_IMAGE = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
    t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512),
)

ZIMAGE_PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' ZImageTransformer2DModel test config, 2 heads of sum(axes_dims) = 16: one block in
    # each of noise_refiner, context_refiner and layers; an 8x8 latent is 16 tokens (padded to 32)
    "tiny": dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0,
        t_scale=1000.0, axes_dims=(8, 4, 4), axes_lens=(256, 32, 32),
    ),
    "z-image-turbo": _Z_IMAGE,
    "z-image": _Z_IMAGE,
}

_SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF: token lists pad to a multiple of it
_PATCH = "2-1"  # the (patch, frame patch) the pipeline runs: forward's defaults patch_size=2, f_patch_size=1


class ZImageVelocityFn:
    """`velocity_fn(z [N, C, H, W], sigma [N], (prompt_embeds [N, T, D], pooled [N, 0][, mask [N, T]])) -> v [N, C, H, W]`,
    v = z1 - z0 at z_σ = (1 - σ) z0 + σ z1, exactly as ZImagePipeline feeds its scheduler.

    ZImagePipeline gives the model each prompt's valid tokens only (a list of `[l_i, D]`); the
    model then pads each to a multiple of 32 with a learned pad token that attention does not
    mask, so zero padding is not neutral. With a mask (a zero-padded cache: `LatentsDataset`) each
    row is cut to its valid tokens `prompt_embeds[i, :l_i]` (l_i = the mask's 1.0 count: the mask
    is a prefix); this reads the lengths on the host, one sync per model call. Without one, all T
    tokens are used (synthetic embeddings, or a cache whose prompts are all T tokens long).
    """

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        prompt_embeds = cond[0]  # cond[1], the pooled [N, 0], has no counterpart in Z-Image
        dtype = next(self.transformer.parameters()).dtype
        caps = list(prompt_embeds.to(dtype).unbind(0))
        if len(cond) > 2:  # the pipeline's ragged prompts: each row's valid prefix
            lengths = (cond[2] > 0).sum(1).tolist()
            caps = [c[: max(int(k), 1)] for c, k in zip(caps, lengths)]
        # the pipeline's timestep: t = 1000σ from the scheduler, then (1000 - t) / 1000, in fp32
        t = sigma.float() * 1000
        t = (1000 - t) / 1000
        out = self.transformer(list(z.to(dtype).unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


def _tokens(name: str, n_img: int, n_txt: int) -> int:
    """Tokens one Linear of a ZImageTransformer2DModel sees per sample (0: it does not run)."""
    parts = name.split(".")
    top = parts[0]
    if top == "t_embedder" or "adaLN_modulation" in parts:
        return 1  # timestep MLP and adaLN modulations act on the per-sample embedding
    if top in ("all_x_embedder", "all_final_layer"):
        return (n_img if top == "all_x_embedder" else n_img + n_txt) if parts[1] == _PATCH else 0
    return {"noise_refiner": n_img, "context_refiner": n_txt, "cap_embedder": n_txt,
            "layers": n_img + n_txt}.get(top, 0)  # siglip_* (Omni only) do not run here


def zimage_forward_flops(model: nn.Module, height: int, width: int, text_len: int) -> float:
    """FLOPs of one forward of one sample at latent size height x width with text_len caption tokens.

        F = Σ_linear 2·in·out·T(linear) + 4·d·(R·N_img² + R·N_txt² + L·N²)
    with N_img = pad32((H/2)(W/2)), N_txt = pad32(text_len), N = N_img + N_txt, d = dim (heads ·
    head_dim), R refiner blocks of each kind, L main layers; T = N_img (x embedder, noise_refiner),
    N_txt (cap_embedder, context_refiner), N (layers, final linear) or 1 (t_embedder, adaLN).
    A multiply-add counts 2; norms, rotary products and softmax are not GEMM work.
    """

    def pad(n: int) -> int:
        return n + (-n) % _SEQ_MULTI_OF

    n_img, n_txt = pad((height // 2) * (width // 2)), pad(text_len)
    n, d = n_img + n_txt, model.config.dim
    flops = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            flops += 2.0 * mod.in_features * mod.out_features * _tokens(name, n_img, n_txt)
    flops += 4.0 * d * (len(model.noise_refiner) * n_img**2 + len(model.context_refiner) * n_txt**2)
    return flops + 4.0 * d * len(model.layers) * n**2


def family() -> ModelFamily:
    """The Z-Image `ModelFamily` (registered by soar_fast.models.spec when this module exists)."""
    return ModelFamily(
        name="zimage", transformer_class="ZImageTransformer2DModel", presets=ZIMAGE_PRESETS,
        velocity=ZImageVelocityFn, block_attrs=("noise_refiner", "context_refiner", "layers"),
        forward_flops=zimage_forward_flops, latent_channels=lambda c: c.in_channels,
        pipeline_class="ZImagePipeline",
        # every block's attention (refiners and main layers): attention.to_q/k/v, attention.to_out.0
        lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
        text_dims=lambda c: (c.cap_feat_dim, 0),
    )
