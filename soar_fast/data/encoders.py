"""The per-family encoders of `soar-fast cache`: VAE latents and text embeddings as each family's
diffusers pipeline computes them (the transformer is never loaded).

| family | pipeline | latents `[C, h, w]` | prompt_embeds `[L, D]` | pooled |
|---|---|---|---|---|
| sd3 | StableDiffusion3Pipeline | `(vae - shift) * scale` | CLIP-L + CLIP-G + T5, padded T5 tokens | `[2048]` |
| flux | FluxPipeline | `(vae - shift) * scale` (2x2 packing in the adapter) | T5, padded | CLIP-L `[768]` |
| zimage | ZImagePipeline | `(vae - shift) * scale` | Qwen3 `hidden_states[-2]` of the chat-templated prompt | `[0]` |
| qwenimage | QwenImagePipeline | `(vae - mean) / std` per channel, frame dropped | Qwen2.5-VL last hidden state, template dropped | `[0]` |
| flux2 | Flux2Pipeline | 2x2 patches, VAE batch-norm normalised (`models.flux2.latents_from_vae`) | Mistral-3 layers (10, 20, 30) stacked, padded | `[0]` |
| wan | WanPipeline (video `[C, f, h, w]`) | `(vae - mean) / std` per channel (AutoencoderKLWan) | umT5 last hidden state, zero-padded | `[0]` |

Padding. SD3, FLUX.1, FLUX.2 and Wan pipelines themselves feed `max_sequence_length` tokens, the pad
tokens' own encoder states included, with no mask: the cache stores exactly that. ZImagePipeline
feeds each prompt's valid tokens only and QwenImagePipeline a mask over zero-padded tokens; for these
two families the cache zero-pads every prompt (Qwen-Image's own pad value) to L = the longest prompt
of the cache, empty prompt included (counted by the pipeline's tokenizer beforehand: `text_length`;
at most `max_sequence_length`), and records each prompt's valid length (`prompt_lengths` in the
shard metadata, `empty_prompt_length` and `text_length` in index.json). `LatentsDataset` turns them
into the text mask the adapters use (docs/families.md, "Prompt padding in the cache").
"""

from __future__ import annotations

from typing import Any

import torch

from soar_fast.config import ConfigError

__all__ = ["MASKED_FAMILIES", "MAX_SEQUENCE_LENGTH", "encode_latents", "encode_prompts", "latent_info",
           "load_encoders", "text_length"]

#: Families whose pipeline drops (Z-Image) or masks (Qwen-Image) padded prompt tokens.
MASKED_FAMILIES = ("zimage", "qwenimage")
#: The longest `max_sequence_length` each family's pipeline takes.
MAX_SEQUENCE_LENGTH = {"sd3": 512, "flux": 512, "zimage": 512, "qwenimage": 1024, "flux2": 512, "wan": 512}


def load_encoders(path: str, family: str, *, device: torch.device, encoder_dtype: torch.dtype,
                  vae_dtype: torch.dtype, variant: str | None = None):  # -> a diffusers pipeline
    """The family's pipeline from a local folder without its transformer; VAE and text encoders
    frozen, in eval mode, on `device`."""
    from soar_fast.models.spec import get_family

    extra = {"transformer_2": None} if family == "wan" else {}  # Wan 2.2's second expert: not loaded either
    pipe = get_family(family).pipeline_cls(path).from_pretrained(
        path, transformer=None, local_files_only=True, variant=variant, torch_dtype=encoder_dtype, **extra,
    )
    pipe.vae.to(device=device, dtype=vae_dtype)
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    for m in [pipe.vae, *encoders]:
        if m is not None:
            m.to(device).requires_grad_(False).eval()
    return pipe


def _pad_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Per-prompt `[l_i, D]` -> `[B, length, D]`, zeros after each prompt's l_i valid rows."""
    if max(r.shape[0] for r in rows) > length:  # text_length counted fewer tokens than the encoder gave
        raise RuntimeError(f"a prompt encodes to {max(r.shape[0] for r in rows)} tokens, more than the {length} "
                           "the cache planned from the tokenizer; re-run with --no-resume")
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def text_length(pipe, family: str, captions: list[str], max_sequence_length: int, chunk: int = 1024) -> int:
    """The L the cache stores: `max_sequence_length`, or for MASKED_FAMILIES the most valid tokens any
    of `captions` gets from the pipeline's own tokenisation (tokenizer only, no encoder run)."""
    if family not in MASKED_FAMILIES:
        return max_sequence_length
    tok, longest = pipe.tokenizer, 0
    for s in range(0, len(captions), chunk):
        part = captions[s : s + chunk]
        if family == "zimage":  # ZImagePipeline._encode_prompt: the chat template, then <= msl tokens
            texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True) for c in part]
            ids = tok(texts, max_length=max_sequence_length, truncation=True).input_ids
            longest = max(longest, *(len(i) for i in ids))
        else:  # QwenImagePipeline._get_qwen_prompt_embeds: the template, its first drop_idx tokens dropped
            drop = pipe.prompt_template_encode_start_idx
            texts = [pipe.prompt_template_encode.format(c) for c in part]
            ids = tok(texts, max_length=pipe.tokenizer_max_length + drop, truncation=True).input_ids
            longest = max(longest, *(min(len(i) - drop, max_sequence_length) for i in ids))
    return max(longest, 1)


def encode_prompts(pipe, family: str, captions: list[str], max_sequence_length: int, device: torch.device,
                   pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """`(prompt_embeds [B, L, D], pooled [B, P], valid lengths)` from the pipeline's own prompt
    encoder (P = 0 for families without a pooled embedding). L = max_sequence_length, or `pad_to`
    (`text_length`) for the zero-padded MASKED_FAMILIES."""
    n, msl = len(captions), max_sequence_length
    if family == "sd3":  # returns (embeds, neg, pooled, neg_pooled)
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=msl,
        )
    elif family == "flux":  # returns (embeds, pooled, text_ids); the ids are zeros and not stored
        pe, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device, max_sequence_length=msl)
    elif family == "zimage":  # a list of each prompt's valid rows of hidden_states[-2]
        rows = pipe._encode_prompt(prompt=list(captions), device=device, max_sequence_length=msl)
        pe = _pad_rows(rows, pad_to or msl)
        return pe, pe.new_zeros(n, 0), [int(r.shape[0]) for r in rows]
    elif family == "qwenimage":  # (embeds [B, l, D] zero-padded to the batch's longest, mask or None)
        pe, mask = pipe.encode_prompt(prompt=list(captions), device=device, max_sequence_length=msl)
        lengths = [int(v) for v in mask.sum(1)] if mask is not None else [pe.shape[1]] * n
        pe = _pad_rows([pe[i, :k] for i, k in enumerate(lengths)], pad_to or msl)
        return pe, pe.new_zeros(n, 0), lengths
    elif family == "flux2":  # (embeds [B, L, D], text_ids): the ids are arange(L) and not stored
        pe, _ = pipe.encode_prompt(prompt=list(captions), device=device, max_sequence_length=msl)
        pooled = pe.new_zeros(n, 0)
    elif family == "wan":  # (embeds [B, L, D] zero-padded to L, negative embeds): umT5, no pooled embedding
        pe, _ = pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False,
                                   max_sequence_length=msl, device=device)
        pooled = pe.new_zeros(n, 0)
    else:
        raise ConfigError(f"soar-fast cache does not support the {family!r} family yet")
    return pe, pooled, [pe.shape[1]] * n


def encode_latents(pipe, family: str, pixels: torch.Tensor, sampling: str,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Pixels `[B, 3, H, W]` (Wan: `[B, 3, F, H, W]`) in [-1, 1] -> the latents the family's transformer
    denoises, `[B, C, h, w]` (Wan: `[B, C, f, h, w]`) fp32."""
    vae = pipe.vae
    x = pixels.to(device=vae.device, dtype=vae.dtype)
    if family == "qwenimage":
        x = x.unsqueeze(2)  # a causal video VAE: an image is one frame [B, 3, 1, H, W]
    dist = vae.encode(x).latent_dist
    lat = (dist.sample(generator) if sampling == "sample" else dist.mode()).float()
    if family in ("flux", "zimage", "qwenimage", "flux2") and (lat.shape[-1] % 2 or lat.shape[-2] % 2):
        raise ConfigError(f"{family} packs 2x2 latent patches but the VAE latents are {tuple(lat.shape[-2:])}: make "
                          f"the resolution / bucket_step a multiple of {2 * pipe.vae_scale_factor}")
    if family == "qwenimage":
        from soar_fast.models.qwenimage import latents_from_vae

        return latents_from_vae(vae, lat)
    if family == "flux2":
        from soar_fast.models.flux2 import latents_from_vae

        return latents_from_vae(vae, lat)
    if family == "wan":  # the inverse of WanPipeline's decode: (x - mean) / std, per channel
        from soar_fast.models.wan import latents_from_vae

        return latents_from_vae(vae, lat)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (lat - shift) * vae.config.scaling_factor


def latent_info(pipe, family: str) -> dict[str, Any]:
    """The VAE normalisation the latents were made with (recorded in index.json)."""
    c = pipe.vae.config
    if family in ("qwenimage", "wan"):
        return {"vae_latents_mean": list(c.latents_mean), "vae_latents_std": list(c.latents_std)}
    if family == "flux2":
        return {"vae_normalisation": "2x2 patches, batch-norm running stats", "vae_batch_norm_eps": c.batch_norm_eps}
    return {"vae_shift_factor": getattr(c, "shift_factor", None) or 0.0, "vae_scaling_factor": c.scaling_factor}
