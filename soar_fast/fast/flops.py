"""FLOPs of an SD3 MMDiT forward, counted per layer with image and text tokens separately.

Formula (one forward, batch of one; a multiply-add counts 2 FLOPs):
    F = Σ_linear 2·in·out·T(linear)  +  Σ_block 4·N²·d_attn  +  Σ_dual 4·N_img²·d_attn  +  F_patch
with T = N_img (image-stream layers: attn.to_q/k/v/out, attn2.*, ff.*, proj_out), N_txt
(text-stream layers: context_embedder, attn.add_*_proj, to_add_out, ff_context.*) or 1
(per-sample layers: time/pooled embedders and the adaLN modulations `norm*.linear`);
N_img = (H/p)(W/p), N = N_img + N_txt, d_attn = heads·head_dim; 4·N²·d is QKᵀ plus PV;
F_patch = 2·C·p²·D·N_img for the patch-embedding convolution.
Training (forward + backward) is 3·F. One SOAR step: 3·F·(1+M)·B + F·2B (the no-grad rollout);
an SFT step: 3·F·B. Norms, activations and softmax are not counted (they are not GEMM work).
"""

from __future__ import annotations

from torch import nn

__all__ = ["sd3_forward_flops", "soar_step_flops"]

_TEXT = ("context_embedder", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.")
_PER_SAMPLE = ("time_text_embed.", "norm")


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


def soar_step_flops(model: nn.Module, batch: int, num_aux: int, height: int, width: int, text_len: int) -> float:
    """FLOPs of one SOAR step (num_aux=0: one SFT step): 3F(1+M)B + 2BF (rollout when M > 0)."""
    f = sd3_forward_flops(model, height, width, text_len)
    rollout = 2 * batch * f if num_aux > 0 else 0.0
    return 3.0 * f * (1 + num_aux) * batch + rollout
