"""FLOPs of one transformer forward (SD3 MMDiT, Flux), counted per layer with image and text
tokens separately. A multiply-add counts 2 FLOPs; batch of one; latent size H x W (unpacked).

SD3 (`SD3Transformer2DModel`):
    F = Σ_linear 2·in·out·T(linear)  +  Σ_block 4·N²·d_attn  +  Σ_dual 4·N_img²·d_attn  +  F_patch
with T = N_img (image-stream layers: attn.to_q/k/v/out, attn2.*, ff.*, proj_out), N_txt
(text-stream layers: context_embedder, attn.add_*_proj, to_add_out, ff_context.*) or 1
(per-sample layers: time/pooled embedders and the adaLN modulations `norm*.linear`);
N_img = (H/p)(W/p), N = N_img + N_txt, d_attn = heads·head_dim; 4·N²·d is QKᵀ plus PV;
F_patch = 2·C·p²·D·N_img for the patch-embedding convolution.

Flux (`FluxTransformer2DModel`; latents packed into 2x2 patches outside the model):
    F = Σ_linear 2·in·out·T(linear)  +  (L_double + L_single)·4·N²·d_attn
with N_img = (H/2)(W/2), N = N_img + N_txt and T = N_img (x_embedder, proj_out and the
double-stream image layers attn.to_q/k/v, attn.to_out.0, ff.*), N_txt (context_embedder and the
double-stream text layers attn.add_*_proj, attn.to_add_out, ff_context.*), N (every linear of a
single-stream block but its modulation: attn.to_q/k/v, proj_mlp, proj_out act on the text+image
concatenation) or 1 (per-sample: time_text_embed.* (time, guidance, pooled), the adaLN
modulations `norm1.linear`, `norm1_context.linear`, `norm.linear`, and `norm_out.linear`).
Both block kinds attend jointly over all N tokens. Rotary embeddings are elementwise (no GEMM).

Norms, activations, softmax and rotary embeddings are not counted (they are not GEMM work).
Training cost per step (forward + backward = 3·F) is `ModelFamily.step_flops` in models/spec.py.
"""

from __future__ import annotations

from torch import nn

__all__ = ["flux_forward_flops", "sd3_forward_flops"]

_TEXT = ("context_embedder", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.")
_PER_SAMPLE = ("time_text_embed.", "norm")
_FLUX_TEXT = (*_TEXT, "to_added_qkv")  # to_added_qkv: diffusers' fused add_{q,k,v}_proj


def sd3_forward_flops(model: nn.Module, height: int, width: int, text_len: int) -> float:
    """FLOPs of one forward of one sample at latent size height x width with text_len tokens."""
    cfg = model.config
    p = cfg.patch_size
    n_img = (height // p) * (width // p)
    n = n_img + text_len
    d_attn = cfg.num_attention_heads * cfg.attention_head_dim
    flops = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if any(s in name for s in _TEXT):
                tokens = text_len
            elif any(s in name for s in _PER_SAMPLE):
                tokens = 1
            else:
                tokens = n_img
            flops += 2.0 * mod.in_features * mod.out_features * tokens
        elif isinstance(mod, nn.Conv2d):
            flops += 2.0 * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] * mod.out_channels * n_img
    for block in model.transformer_blocks:
        flops += 4.0 * n * n * d_attn
        if getattr(block, "attn2", None) is not None:
            flops += 4.0 * n_img * n_img * d_attn
    return flops


def _flux_tokens(name: str, n_img: int, n_txt: int) -> int:
    """Tokens one Linear of a FluxTransformer2DModel sees, from its module name."""
    parts = name.split(".")
    if parts[0] == "time_text_embed" or (len(parts) > 1 and parts[-2].startswith("norm")):
        return 1  # time/guidance/pooled embedders, adaLN modulations, norm_out.linear
    if parts[0] == "single_transformer_blocks":
        return n_img + n_txt  # single-stream blocks act on the text+image concatenation
    if any(s in name for s in _FLUX_TEXT):
        return n_txt
    return n_img  # x_embedder, proj_out, double-stream image layers


def flux_forward_flops(model: nn.Module, height: int, width: int, text_len: int) -> float:
    """FLOPs of one forward of one sample whose unpacked latent is height x width (packed into
    (H/2)(W/2) image tokens) with text_len text tokens."""
    cfg = model.config
    n_img = (height // 2) * (width // 2)
    n = n_img + text_len
    d_attn = cfg.num_attention_heads * cfg.attention_head_dim
    flops = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            flops += 2.0 * mod.in_features * mod.out_features * _flux_tokens(name, n_img, text_len)
    num_blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    return flops + num_blocks * 4.0 * n * n * d_attn
