"""A latent cache's validation prompts (`soar-fast cache --validation_prompts FILE`): read, encode, reuse.

A `.txt` file holds one prompt a line (blank lines and `#` comments skipped). FLUX.1 Kontext edits an
input image, so its validation set is a `.jsonl` file of `{"prompt": ..., "image": ...}` rows (the
image path relative to the file's folder, or absolute). The prompts are encoded by the cache's prompt
encoder into `validation.safetensors` (`prompt_embeds [K, L, D]`, `pooled [K, P]`, L as the shards';
Kontext adds `reference [K, C, h, w]`: each image square-cropped to `data.resolution` and encoded as
the shards' references), the texts (and images) in index.json's `validation` entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from soar_fast.config import ConfigError
from soar_fast.data.encoders import MASKED_FAMILIES, encode_latents, encode_prompts
from soar_fast.data.pixels import load_resized
from soar_fast.data.shards import (
    REFERENCE,
    ShardError,
    ShardWriter,
    _save_atomic,
    _tensor_info,
    verify_shard,
)

__all__ = ["VALIDATION_FILE", "ValidationSet", "read_validation_set", "validation_done", "write_validation"]

VALIDATION_FILE = "validation.safetensors"
_PROMPT_KEYS, _IMAGE_KEYS = ("prompt", "text", "caption"), ("image", "file_name", "image_path")


@dataclass(frozen=True)
class ValidationSet:
    prompts: list[str]
    images: list[str] | None = None
    """FLUX.1 Kontext: each prompt's input image (resolved paths); None for text-to-image prompts."""


def read_validation_set(path: str) -> ValidationSet:
    """The prompts (and, from a .jsonl, images) of a `--validation_prompts` file; one-line `ConfigError`s for a
    missing, unreadable or empty file and for a row without its prompt or with an image that is not a file."""
    p = Path(path).expanduser()
    fix = "pass a .txt file with one prompt a line (FLUX.1 Kontext: a .jsonl of {\"prompt\": ..., \"image\": ...})"
    if not p.is_file():
        raise ConfigError(f"--validation_prompts {path}: {'a folder' if p.is_dir() else 'no such file'}; {fix}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"--validation_prompts {path} is not UTF-8 text; {fix}") from None
    if p.suffix.lower() != ".jsonl":
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise ConfigError(f"--validation_prompts {path} holds no prompts; {fix}")
        return ValidationSet(prompts)
    prompts, images = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--validation_prompts {path}:{i}: not valid JSON ({e.msg})") from None
        prompt = next((row[k] for k in _PROMPT_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        image = next((row[k] for k in _IMAGE_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if prompt is None:
            raise ConfigError(f"--validation_prompts {path}:{i}: no \"prompt\" string; each row is "
                              "{\"prompt\": ..., \"image\": ...}")
        if image is not None:
            q = Path(image).expanduser()
            q = q if q.is_absolute() else p.parent / q
            if not q.is_file():
                raise ConfigError(f"--validation_prompts {path}:{i}: image {image} is not a file (paths are relative "
                                  f"to {p.parent})")
            image = str(q.resolve())
        prompts.append(prompt.strip())
        images.append(image)
    if not prompts:
        raise ConfigError(f"--validation_prompts {path} holds no prompts; {fix}")
    if any(im is None for im in images) and any(im is not None for im in images):
        raise ConfigError(f"--validation_prompts {path}: some rows have an \"image\" and some not; give every row one "
                          "(FLUX.1 Kontext) or none")
    return ValidationSet(prompts, images if images[0] is not None else None)


def validation_done(writer: ShardWriter, vs: ValidationSet | None) -> bool:
    """True when nothing is asked, or the cache already holds exactly `vs` and its file verifies."""
    if vs is None:
        return True
    e = writer.index.get("validation")
    if e is None or e.get("prompts") != vs.prompts or e.get("images") != vs.images:
        return False
    try:
        verify_shard(writer.dir, e)
    except ShardError:
        return False
    return True


@torch.no_grad()
def write_validation(writer: ShardWriter, pipe, family: str, vs: ValidationSet, cfg, text_len: int,
                     device: torch.device) -> None:
    """Encode `vs` like the captions (padded to the shards' L; the zero-padded families truncate a longer
    prompt to L; Kontext images as the shards' references) into VALIDATION_FILE and record it in index.json.
    `cfg` is the run's `CacheConfig`."""
    prompts = vs.prompts
    msl = min(cfg.max_sequence_length, text_len) if family in MASKED_FAMILIES else cfg.max_sequence_length
    pes, pooleds, lengths, refs = [], [], [], []
    for s in range(0, len(prompts), cfg.batch_size):
        pe, pooled, n = encode_prompts(pipe, family, prompts[s : s + cfg.batch_size], msl, device, text_len)
        pes.append(pe)
        pooleds.append(pooled)
        lengths += n
        if vs.images is not None:  # FluxKontextPipeline._encode_vae_image: the posterior mode, normalised
            size = (cfg.data.resolution, cfg.data.resolution)
            px = torch.stack([load_resized(f, size, cfg.data.center_crop) for f in vs.images[s : s + cfg.batch_size]])
            refs.append(encode_latents(pipe, family, px, "mode", None))
    store = getattr(torch, cfg.store_dtype)
    tensors = {"prompt_embeds": torch.cat(pes).to(store).cpu().contiguous(),
               "pooled": torch.cat(pooleds).to(store).cpu().contiguous()}
    if refs:
        tensors[REFERENCE] = torch.cat(refs).to(store).cpu().contiguous()
    digest = _save_atomic(tensors, writer.dir / VALIDATION_FILE)
    entry = {"file": VALIDATION_FILE, "tensors": _tensor_info(tensors), "sha256": digest, "prompts": prompts}
    if vs.images is not None:
        entry["images"] = vs.images
    if family in MASKED_FAMILIES:
        entry["prompt_lengths"] = lengths
    writer.index["validation"] = entry
    writer.flush()
