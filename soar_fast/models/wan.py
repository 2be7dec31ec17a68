"""Wan 2.1 / 2.2 text-to-video (diffusers `WanTransformer3DModel`, pipeline `WanPipeline`) as a SOAR
`velocity_fn`, its FLOP formula, its family spec and the Wan 2.2 two-expert router.

What differs from SD3 (and is handled here), read off diffusers' WanPipeline.__call__:
- Latents are video: `[N, C, F, H, W]` (16 channels for Wan 2.1 and Wan 2.2 A14B; the VAE is 4x
  temporal, 8x spatial). The model patchifies them itself with a Conv3d of patch (1, 2, 2), so
  F, H and W only need to be multiples of the patch; positions are the model's own 3-axis RoPE.
- The timestep is the scheduler's `t = 1000σ` itself (`t.expand(N)`, fp32): the model's
  sinusoidal embedding has no scale, so the adapter passes `1000σ`.
- The flow direction is SD3's: with FlowMatchEulerDiscreteScheduler the pipeline steps
  `z + (σ' - σ) v`, and the release's UniPCMultistepScheduler (`prediction_type='flow_prediction'`)
  takes `x0 = z - σ v`; both mean v = z1 - z0 (noise minus data), SOAR's convention.
- Text: umT5 hidden states `[N, T, 4096]` (T = 512 with zero padding past each prompt, as
  `_get_t5_prompt_embeds` pads); no pooled embedding, so `text_dims` is (text_dim, 0) and the data's
  pooled `[N, 0]` is ignored; no attention mask (the pipeline passes none: the pads are zeros).
- CFG is true CFG against the negative prompt, `u + g (c - u)`, SOAR's rollout combination.
- Wan 2.2 A14B has two experts (`transformer` for t >= boundary_ratio·1000, `transformer_2` below;
  boundary_ratio 0.875 in Wan-AI/Wan2.2-T2V-A14B-Diffusers model_index.json): `WanExperts` holds
  both and `WanExpertsVelocityFn` sends each row of a batched call to the expert owning its σ.
- Not handled: image-to-video (`image_dim`, `added_kv_proj_dim`: CLIP image tokens in the cross
  attention) and Wan 2.2 TI2V-5B's per-token timesteps (`expand_timesteps`; for text-to-video they
  are all equal, which is what the scalar timestep passed here computes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["WAN22_BOUNDARY_RATIO", "WAN_PRESETS", "WanExperts", "WanExpertsVelocityFn", "WanVelocityFn", "experts_family",
           "family", "latents_from_vae", "latents_to_vae", "vae_stats", "wan_forward_flops"]

WAN_PRESETS: dict[str, dict[str, Any]] = {
    # diffusers' own WanTransformer3DModel test config (tests/models/transformers/
    # test_models_transformer_wan.py): 2 blocks, 2 heads of 12, 4 latent channels, text width 16.
    "tiny": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (the release's t2v_1_3B config:
    # dim 1536 = 12 x 128, ffn 8960, 30 layers), ~1.42B parameters.
    "wan2.1-t2v-1.3b": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (t2v_14B: dim 5120 = 40 x 128, ffn
    # 13824, 40 layers; the class defaults), ~14.3B parameters. Each expert of
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers (transformer/, transformer_2/) has this same config.
    "wan2.1-t2v-14b": dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
}
#: Wan-AI/Wan2.2-T2V-A14B-Diffusers model_index.json: the high-noise expert owns t >= 0.875 · 1000.
WAN22_BOUNDARY_RATIO = 0.875


def _check_video(z: torch.Tensor, patch: tuple[int, ...]) -> None:
    if z.dim() != 5:
        raise ValueError(f"Wan takes video latents [N, C, F, H, W], got a {z.dim()}-D tensor {tuple(z.shape)}; "
                         "set --data.latent_frames (synthetic) or cache videos")
    if any(s % p for s, p in zip(z.shape[2:], patch)):
        raise ValueError(f"Wan latents need frames, height and width divisible by its patch {tuple(patch)}, "
                         f"got {tuple(z.shape[2:])}")


class WanVelocityFn:
    """`velocity_fn(z [N, C, F, H, W], sigma [N], (prompt_embeds [N, T, D], pooled [N, 0])) -> v [N, C, F, H, W]`:
    one WanPipeline transformer call (the conditional branch), v = z1 - z0."""

    latent_ndim = 5  # the latent rank this adapter takes (the trainer and parity read it)

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        prompt_embeds = cond[0]  # cond[1], the pooled [N, 0], has no counterpart in Wan
        _check_video(z, tuple(self.transformer.config.patch_size))
        # the patch embedding's dtype: the first parameter (scale_shift_table) may be a kept-fp32 one
        dtype = self.transformer.patch_embedding.weight.dtype
        return self.transformer(
            hidden_states=z.to(dtype),
            timestep=sigma.float() * 1000,  # the scheduler's timestep t = 1000σ, as WanPipeline passes it
            encoder_hidden_states=prompt_embeds.to(dtype),
            return_dict=False,
        )[0]


class WanExperts(nn.Module):
    """Wan 2.2's two experts in one module: `high` (WanPipeline's `transformer`) owns σ >= boundary,
    `low` (`transformer_2`) owns σ < boundary (the pipeline's `t >= boundary_ratio · 1000`).

    `train` picks which experts learn ('both', 'high' or 'low'); the other is frozen
    (requires_grad False), so its rows still flow through the step but give no gradient.
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float = WAN22_BOUNDARY_RATIO,
                 train: str = "both"):
        super().__init__()
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"the expert boundary σ must lie in (0, 1), got {boundary}")
        if train not in ("both", "high", "low"):
            raise ValueError(f"train={train!r}: choose 'both', 'high' or 'low'")
        self.high, self.low, self.boundary, self.train_experts = high, low, float(boundary), train
        for name, expert in (("high", high), ("low", low)):
            if train not in ("both", name):
                expert.requires_grad_(False)

    @property
    def config(self):  # the experts share one architecture (the family's sizes come from it)
        return self.high.config

    @property
    def _keep_in_fp32_modules(self) -> list[str]:  # each expert's (names match inside `high.` / `low.`)
        return list(getattr(self.high, "_keep_in_fp32_modules", None) or [])

    def forward(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """v [N, C, F, H, W] of the rows of one batched call (base, rollout and aux points mixed):
        split by σ, each expert on its own rows, scattered back in order.

        Under FSDP2 over W > 1 ranks every rank runs both experts in every call, high first: their
        block all-gathers and gradient reduce-scatters are collectives matched by order, so a rank
        whose rows all belong to one expert runs the other on a single row whose output is weighted
        0 (value and gradient exactly 0) instead of skipping it."""
        high = sigma >= self.boundary
        n_high = int(high.sum())  # one host sync per call: the split needs the counts
        if n_high in (0, z.shape[0]):
            if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
                return WanVelocityFn(self.high if n_high else self.low)(z, sigma, cond)
            one = (z[:1], sigma[:1], tuple(c[:1] for c in cond))
            v_h = WanVelocityFn(self.high)(*((z, sigma, cond) if n_high else one))
            v_l = WanVelocityFn(self.low)(*(one if n_high else (z, sigma, cond)))
            v, idle = (v_h, v_l) if n_high else (v_l, v_h)
            return v + idle.float().nan_to_num(0.0, 0.0, 0.0).sum().to(v.dtype) * 0
        idx_h, idx_l = high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)
        v_h = WanVelocityFn(self.high)(z[idx_h], sigma[idx_h], tuple(c[idx_h] for c in cond))
        v_l = WanVelocityFn(self.low)(z[idx_l], sigma[idx_l], tuple(c[idx_l] for c in cond))
        out = v_h.new_empty((z.shape[0], *v_h.shape[1:]))
        return out.index_copy(0, idx_h, v_h).index_copy(0, idx_l, v_l.to(v_h.dtype))

    # the experts' own block lists (not copies): checkpointing, compile and FSDP wrap them in place
    @property
    def high_blocks(self) -> nn.ModuleList:
        return self.high.blocks

    @property
    def low_blocks(self) -> nn.ModuleList:
        return self.low.blocks

    @staticmethod
    def is_folder(path: str | Path) -> bool:
        """A local pipeline folder whose model_index.json names `transformer_2` and a `boundary_ratio`."""
        try:
            index = json.loads((Path(path) / "model_index.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return index.get("boundary_ratio") is not None and (index.get("transformer_2") or [None])[0] is not None

    @classmethod
    def from_pretrained(cls, path: str | Path, train: str = "both", **kwargs: Any) -> WanExperts:
        """Both experts of a local Wan 2.2 pipeline folder (`transformer/` high noise, `transformer_2/`
        low noise) and its model_index.json `boundary_ratio` (local files only)."""
        from diffusers import WanTransformer3DModel

        if not cls.is_folder(path):
            raise ValueError(f"{str(path)!r} is not a two-expert Wan 2.2 folder (no transformer_2 / boundary_ratio)")
        index = json.loads((Path(path) / "model_index.json").read_text())
        load = lambda sub: WanTransformer3DModel.from_pretrained(  # noqa: E731
            str(path), subfolder=sub, local_files_only=True, **kwargs)
        return cls(load("transformer"), load("transformer_2"), boundary=index["boundary_ratio"], train=train)


class WanExpertsVelocityFn:
    """`velocity_fn` of a `WanExperts`: one call of the module (`WanExperts.forward` routes the
    rows), so FSDP's root unit gathers both experts' non-block weights around it."""

    latent_ndim = 5

    def __init__(self, experts: WanExperts):
        self.experts = experts

    def __call__(self, z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.experts(z, sigma, tuple(cond))


def vae_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents_mean, 1 / latents_std) of an AutoencoderKLWan-style VAE (Wan's, Qwen-Image's), each
    `[1, C, 1, 1, 1]` in `like`'s device and dtype, as the pipelines build them."""
    c = vae.config
    mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
    return mean, inv_std


def latents_from_vae(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents `[N, C, f, h, w]` -> the model's normalised latents: `(x - mean) * (1 / std)` per channel."""
    mean, inv_std = vae_stats(vae, latents)
    return (latents - mean) * inv_std


def latents_to_vae(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Inverse of `latents_from_vae`, for `vae.decode`: WanPipeline's `latents / latents_std + latents_mean`
    (its latents_std is 1 / std)."""
    mean, inv_std = vae_stats(vae, z)
    return z / inv_std + mean


def _tokens(name: str, n_img: int, n_txt: int) -> int:
    """Tokens one Linear of a WanTransformer3DModel sees, from its module name."""
    parts = name.split(".")
    if parts[0] == "condition_embedder":
        return n_txt if parts[1] == "text_embedder" else 1  # time_embedder, time_proj: per sample
    if len(parts) > 3 and parts[2] == "attn2" and parts[3] in ("to_k", "to_v"):
        return n_txt  # cross-attention keys and values project the text
    return n_img  # proj_out, attn1.*, attn2.to_q / to_out.0, ffn.*


def wan_forward_flops(model: nn.Module, latent_h: int, latent_w: int, text_len: int, frames: int = 1) -> float:
    """FLOPs of one forward of one sample whose latent is frames x latent_h x latent_w, with
    text_len text tokens.

        F = 2·N·C·p·d + Σ_linear 2·in·out·T(linear) + L·4·d·(N² + N·N_txt)
    with N = (F/p_t)(H/p_h)(W/p_w) video tokens, p = p_t·p_h·p_w, d = heads·head_dim: the first
    term is the Conv3d patch embedding; T = N (attn1.*, attn2.to_q, attn2.to_out.0, ffn.*,
    proj_out), N_txt (text_embedder.*, attn2.to_k / to_v) or 1 (time_embedder, time_proj). Each
    block's self attention costs 4·N²·d (QKᵀ plus PV), its cross attention 4·N·N_txt·d. Norms, RoPE,
    modulation and activations are not GEMM work (as in models/flops.py). T2V only: the I2V image
    embedder and added K/V projections are not counted.
    """
    cfg = model.config
    p_t, p_h, p_w = cfg.patch_size
    n = (frames // p_t) * (latent_h // p_h) * (latent_w // p_w)
    d = cfg.num_attention_heads * cfg.attention_head_dim
    flops = 2.0 * n * cfg.in_channels * math.prod(cfg.patch_size) * d
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            flops += 2.0 * mod.in_features * mod.out_features * _tokens(name, n, text_len)
    return flops + len(model.blocks) * 4.0 * d * (n * n + n * text_len)


def experts_family():  # -> ModelFamily
    """The Wan family for a `WanExperts` model: `build_train_step(experts_family(), experts, ...)`
    runs SOAR (eager or fast step) with every model call routed by σ, over both experts' blocks."""
    import dataclasses

    return dataclasses.replace(family(), velocity=WanExpertsVelocityFn, block_attrs=("high_blocks", "low_blocks"))


def family():  # -> ModelFamily (imported here: spec.py imports this module when registering)
    """The Wan family spec (registered by soar_fast.models.spec when this module exists)."""
    from soar_fast.models.spec import ModelFamily

    return ModelFamily(
        name="wan", transformer_class="WanTransformer3DModel", presets=WAN_PRESETS,
        velocity=WanVelocityFn, block_attrs=("blocks",),
        forward_flops=wan_forward_flops, latent_channels=lambda c: c.in_channels,
        pipeline_class="WanPipeline",
        # self- and cross-attention projections of every block (attn1.*, attn2.*): the targets of
        # diffusers' Wan LoRA examples; WanPipeline.load_lora_weights reads them back
        lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
        text_dims=lambda c: (c.text_dim, 0),
    )
