"""`soar-fast cache`: encode an image-caption folder once with a pipeline's VAE and text encoders.

Works for local StableDiffusion3Pipeline, FluxPipeline, ZImagePipeline, QwenImagePipeline,
Flux2Pipeline and WanPipeline folders (Wan: a folder of clips, `soar_fast.data.video`, latents
`[C, f, h, w]`); the transformer is never loaded. Latents and text embeddings are what the
family's pipeline computes (`soar_fast.data.encoders`: per-family VAE normalisation, text encoder
and padding), stored per sample as `(latents [C, h, w], prompt_embeds [L, D], pooled [P])`, P = 0
for the families without a pooled embedding. The empty prompt is encoded once. The result is a
shard folder (`soar_fast.data.shards`) that training reads through `BatchStream`; index.json
records the family, so `soar-fast train` on another family's model is refused.

Resuming: the plan (which images go to which shard) is a deterministic function of the sorted
image list and the settings, summarised by a fingerprint stored in index.json. Re-running with
the same arguments skips shards that are complete and verify, and rewrites the rest.

Validation prompts (`--validation_prompts FILE`, one prompt a line; FLUX.1 Kontext: a .jsonl of
prompts and input images): encoded by the same encoders into `validation.safetensors`
(soar_fast.data.validation_prompts); `soar-fast train --validation_steps N` samples them
(soar_fast.train.validation). They are not part of the fingerprint: adding them to
an existing cache (or changing them) re-encodes only them; a re-run with the same prompts, or
without the flag, keeps them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from soar_fast.config import ConfigError
from soar_fast.config.sd35 import KONTEXT_PIPELINE, pipeline_class_name, pipeline_family
from soar_fast.data.encoders import (
    MASKED_FAMILIES,
    MAX_SEQUENCE_LENGTH,
    encode_latents,
    encode_prompts,
    latent_info,
    load_encoders,
    text_length,
)
from soar_fast.data.images import (
    CaptionError,
    ImageFolderConfig,
    ImageRecord,
    nearest_bucket,
    scan_image_folder,
)
from soar_fast.data.pixels import load_batches, reference_file
from soar_fast.data.shards import (
    EMPTY_PROMPT_FILE,
    INDEX_FILE,
    REFERENCE,
    ShardError,
    ShardWriter,
    read_index,
    verify_cache,
)
from soar_fast.data.validation_prompts import (
    VALIDATION_FILE,
    ValidationSet,
    read_validation_set,
    validation_done,
    write_validation,
)
from soar_fast.data.video import check_num_frames, holds_clips, scan_clip_folder

__all__ = ["CacheConfig", "CacheResult", "plan_shards", "run_cache"]

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(kw_only=True)
class CacheConfig:
    """Inputs and settings of `soar-fast cache`."""

    pretrained_model_name_or_path: str
    """Local diffusers pipeline folder (read with local_files_only=True): StableDiffusion3Pipeline,
    FluxPipeline, ZImagePipeline, QwenImagePipeline or Flux2Pipeline."""
    data: ImageFolderConfig
    """The image folder, its captions and the target resolution / buckets."""
    output_dir: str
    """Cache folder to write (index.json + shards)."""
    max_sequence_length: int = 256
    """Text tokens per caption (the pipeline's max_sequence_length: SD3 samples with 256, Flux-dev and
    FLUX.2 512). Z-Image and Qwen-Image prompts are truncated to it and zero-padded to the cache's
    longest prompt (see soar_fast.data.encoders)."""
    batch_size: int = 8
    """Images encoded per forward pass."""
    num_workers: int = 4
    """Threads decoding and resizing images ahead of the encoders (0: in the main thread)."""
    shard_size: int = 256
    """Samples per shard file (one latent shape per shard)."""
    latent_sampling: Literal["mode", "sample"] = "mode"
    """'mode': the VAE posterior mean (deterministic); 'sample': one draw, seeded per shard."""
    seed: int = 0
    """Seed of `latent_sampling='sample'`."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ..."""
    encoder_dtype: DType = "auto"
    """Text-encoder dtype; 'auto' is bfloat16 on CUDA and float32 on CPU."""
    vae_dtype: DType = "float32"
    """VAE dtype ('auto' as above); float32 is the safe default for SD3's VAE."""
    store_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the stored latents and embeddings."""
    variant: str | None = None
    """Weights variant of the checkpoint (e.g. 'fp16'), as diffusers' `variant`."""
    resume: bool = True
    """Keep shards of an earlier run with the same settings that verify; False rebuilds all."""
    progress: bool = True
    """Show a tqdm progress bar."""
    num_frames: int = 17
    """Wan (video) pipelines only: frames per clip, 4k + 1 (81 is WanPipeline's default length, at 16 fps). The
    input is a folder of clips, each a video file (.mp4 etc. with PyAV, .gif) or a subfolder of frames
    (soar_fast.data.video)."""
    frame_stride: int = 1
    """Wan only: take every k-th frame of each clip from its first (2 turns 30 fps footage into 15 fps, near
    Wan's 16); a clip needs (num_frames - 1) * frame_stride + 1 frames."""
    reference_root: str | None = None
    """FLUX.1 Kontext (FluxKontextPipeline folders) only: the folder of reference (input) images, one for each
    image of `data.root` at the same relative path (any image extension: `refs/a/x.jpg` for `data.root/a/x.png`);
    each is resized and cropped to its image's size (see `reference_size`) and cached as `reference` latents. A
    separate folder."""
    reference_size: Literal["image", "own"] = "image"
    """FLUX.1 Kontext: 'image' crops each reference to its image's bucket; 'own' to the bucket of its own aspect
    ratio (`data.aspect_buckets`' list, else the square): an edit may change the aspect ratio. Shards then group
    by (image bucket, reference bucket)."""
    validation_prompts: str | None = None
    """A .txt file of prompts (one a line; blank lines and `#` comments skipped) to encode too, for the
    validation images of `soar-fast train --validation_steps N`; a re-run keeps them (None: keep any there).
    FLUX.1 Kontext: a .jsonl of `{"prompt": ..., "image": ...}` rows, the input image of each edit."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"CacheConfig.num_workers={self.num_workers} is invalid: need >= 0")
        for name in ("max_sequence_length", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CacheConfig.{name}={getattr(self, name)} is invalid: need >= 1")
        if self.frame_stride < 1:
            raise ConfigError(f"CacheConfig.frame_stride={self.frame_stride} is invalid: need >= 1")
        if (why := check_num_frames(self.num_frames)) is not None:
            raise ConfigError(f"CacheConfig.num_frames={self.num_frames} is invalid: {why}")
        if self.max_sequence_length > max(MAX_SEQUENCE_LENGTH.values()):
            raise ConfigError(f"CacheConfig.max_sequence_length={self.max_sequence_length} is invalid: need <= "
                              f"{max(MAX_SEQUENCE_LENGTH.values())}")


@dataclass
class CacheResult:
    """What `run_cache` did: shard counts, samples, and the images it left out (with reasons)."""

    output_dir: str
    num_samples: int
    num_shards: int
    shards_written: int
    shards_reused: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    validation_prompts: int = 0
    """Validation prompts the cache holds."""
    validation_written: bool = False
    """Whether this run (re-)encoded them (False: none asked, or reused)."""


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def plan_shards(records: list[ImageRecord], shard_size: int) -> list[list[ImageRecord]]:
    """Records grouped by bucket (with Kontext references of their own size: by the pair of image and
    reference buckets; sorted), then cut into shards of at most `shard_size`."""
    by_bucket: dict[tuple, list[ImageRecord]] = {}
    for r in records:
        by_bucket.setdefault((*r.bucket, *(r.reference_bucket or r.bucket)), []).append(r)
    plan = []
    for bucket in sorted(by_bucket):
        rs = by_bucket[bucket]
        plan += [rs[i : i + shard_size] for i in range(0, len(rs), shard_size)]
    return plan


def _fingerprint(cfg: CacheConfig, plan: list[list[ImageRecord]]) -> str:
    ignore = ("resume", "progress", "device", "batch_size", "num_workers", "output_dir", "validation_prompts")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    settings["data"].pop("verify_decode", None)
    settings["pretrained_model_name_or_path"] = str(Path(cfg.pretrained_model_name_or_path).resolve())
    settings["plan"] = [[(r.path, r.caption, r.bucket, *((r.reference_bucket,) if r.reference_bucket else ()))
                         for r in shard] for shard in plan]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def _encode_batch(pipe, family: str, pixels: torch.Tensor, captions: list[str], cfg: CacheConfig, text_len: int,
                  device: torch.device, generator: torch.Generator | None,
                  references: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], list[int]]:
    lat = encode_latents(pipe, family, pixels, cfg.latent_sampling, generator)
    pe, pooled, lengths = encode_prompts(pipe, family, captions, cfg.max_sequence_length, device, text_len)
    store = getattr(torch, cfg.store_dtype)
    tensors = {"latents": lat.to(store).cpu(), "prompt_embeds": pe.to(store).cpu(), "pooled": pooled.to(store).cpu()}
    if references is not None:  # FluxKontextPipeline._encode_vae_image: the posterior mode, normalised as the latents
        tensors[REFERENCE] = encode_latents(pipe, family, references, "mode", None).to(store).cpu()
    return tensors, lengths


def _check_reference(cfg: CacheConfig, family: str, val: ValidationSet | None) -> tuple[str, str] | None:
    """`(data.root, reference_root)` for a FLUX.1 Kontext folder, None for any other; one-line errors for a
    Kontext folder without references (or with validation prompts without images) and for references or
    validation images given to another folder."""
    kontext = pipeline_class_name(cfg.pretrained_model_name_or_path) == KONTEXT_PIPELINE
    if not kontext:
        if cfg.reference_root:
            raise ConfigError(f"--reference_root is for FLUX.1 Kontext (FluxKontextPipeline) folders, but "
                              f"{cfg.pretrained_model_name_or_path} is a {family} text-to-image pipeline; drop it")
        if cfg.reference_size != "image":
            raise ConfigError(f"--reference_size is for FLUX.1 Kontext (FluxKontextPipeline) folders, but "
                              f"{cfg.pretrained_model_name_or_path} is a {family} text-to-image pipeline; drop it")
        if val is not None and val.images is not None:
            raise ConfigError(f"--validation_prompts {cfg.validation_prompts}: input images are for FLUX.1 Kontext "
                              f"folders, but {cfg.pretrained_model_name_or_path} is a {family} text-to-image pipeline; "
                              "pass a .txt of prompts")
        return None
    if not cfg.reference_root or not Path(cfg.reference_root).is_dir():
        raise ConfigError(f"{cfg.pretrained_model_name_or_path} is a FLUX.1 Kontext pipeline: pass --reference_root "
                          f"<folder of the input images, same relative paths as {cfg.data.root}>"
                          + (f" ({cfg.reference_root} is not a folder)" if cfg.reference_root else ""))
    if val is not None and val.images is None:
        raise ConfigError(f"--validation_prompts {cfg.validation_prompts}: a FLUX.1 Kontext validation edits an input "
                          "image per prompt; pass a .jsonl of {\"prompt\": ..., \"image\": ...} rows")
    return cfg.data.root, cfg.reference_root


def _own_reference_bucket(r: ImageRecord, reference: tuple[str, str], buckets) -> ImageRecord:
    """r with the bucket of its reference's own aspect ratio; unchanged when the reference cannot be read (its
    load then skips r and says why)."""
    try:
        with Image.open(reference_file(r, *reference)) as im:
            return replace(r, reference_bucket=nearest_bucket(*im.size, buckets))
    except Exception:  # noqa: BLE001 - missing or unreadable: reported when the shard is written
        return r


def run_cache(cfg: CacheConfig) -> CacheResult:
    """Encode `cfg.data` into shards at `cfg.output_dir`; resumable. Returns a `CacheResult`.

    Raises `NotAPipelineError` for a folder that is not a pipeline of a supported family, `CaptionError` for a
    missing caption; corrupt images are skipped and listed in the result and in index.json.
    """
    from tqdm.auto import tqdm

    val_prompts = read_validation_set(cfg.validation_prompts) if cfg.validation_prompts else None
    family = pipeline_family(cfg.pretrained_model_name_or_path)
    if cfg.max_sequence_length > MAX_SEQUENCE_LENGTH[family]:
        raise ConfigError(f"CacheConfig.max_sequence_length={cfg.max_sequence_length} is invalid for a {family} "
                          f"pipeline: it takes <= {MAX_SEQUENCE_LENGTH[family]} tokens")
    video = family == "wan"
    reference = _check_reference(cfg, family, val_prompts)
    try:
        scan = scan_clip_folder(cfg.data, cfg.num_frames, cfg.frame_stride) if video else scan_image_folder(cfg.data)
    except (CaptionError, FileNotFoundError) as e:
        if video or not holds_clips(cfg.data):
            raise
        raise type(e)(f"{e} ({cfg.data.root} holds video clips: a {family} pipeline caches "
                      "images; cache the clips with a Wan pipeline, or give a folder of images)") from None
    skipped = [{"path": s.path, "reason": s.reason} for s in scan.skipped]
    records = scan.records
    if reference and cfg.reference_size == "own":
        records = [_own_reference_bucket(r, reference, scan.buckets) for r in records]
    plan = plan_shards(records, cfg.shard_size)
    out = Path(cfg.output_dir)
    if not cfg.resume and out.is_dir():
        for p in [out / INDEX_FILE, out / EMPTY_PROMPT_FILE, out / VALIDATION_FILE, *out.glob("shard-*.safetensors*")]:
            p.unlink(missing_ok=True)
    device = _resolve_device(cfg.device)
    info = {
        "pipeline": str(Path(cfg.pretrained_model_name_or_path).resolve()),
        "family": family,
        "max_sequence_length": cfg.max_sequence_length,
        "resolution": cfg.data.resolution,
        "buckets": scan.buckets,
        "latent_sampling": cfg.latent_sampling,
        **({"num_frames": cfg.num_frames, "frame_stride": cfg.frame_stride} if video else {}),
        **({"reference_root": str(Path(cfg.reference_root).resolve()), "reference_size": cfg.reference_size}
           if reference else {}),
    }
    if cfg.resume and (out / INDEX_FILE).is_file():  # a cache of another family: say so (not just "other settings")
        prev = read_index(out).get("info", {}).get("family")
        if prev not in (None, family):
            raise ShardError(f"{out} holds a cache made by a {prev} pipeline but {cfg.pretrained_model_name_or_path} "
                             f"is a {family} pipeline; pass another --output_dir (or --no-resume to rebuild it)")
    writer = ShardWriter(out, _fingerprint(cfg, plan), info)
    todo = [i for i in range(len(plan)) if not writer.is_done(i)]
    need_empty = not writer.is_done_empty()
    need_validation = not validation_done(writer, val_prompts)
    reused = len(plan) - len(todo)
    pipe, text_len = None, cfg.max_sequence_length
    if todo or need_empty or need_validation:
        pipe = load_encoders(cfg.pretrained_model_name_or_path, family, device=device, variant=cfg.variant,
                             encoder_dtype=_resolve_dtype(cfg.encoder_dtype, device),
                             vae_dtype=_resolve_dtype(cfg.vae_dtype, device))
        writer.index["info"].update(latent_info(pipe, family))
        # the stored prompt length: a function of the captions and settings, so equal on a resume
        text_len = text_length(pipe, family, [r.caption for r in scan.records] + [""], cfg.max_sequence_length)
        writer.index["info"]["text_length"] = text_len
    if need_empty:
        with torch.no_grad():
            pe, pooled, lengths = encode_prompts(pipe, family, [""], cfg.max_sequence_length, device, text_len)
        if family in MASKED_FAMILIES:  # valid tokens of the empty prompt (the rest are zero padding)
            writer.index["info"]["empty_prompt_length"] = lengths[0]
        store = getattr(torch, cfg.store_dtype)
        writer.write_empty_prompt(pe[0].to(store).cpu(), pooled[0].to(store).cpu())
    if need_validation:
        write_validation(writer, pipe, family, val_prompts, cfg, text_len, device)

    done_samples = sum(len(plan[i]) for i in set(range(len(plan))) - set(todo))
    bar = tqdm(total=len(scan.records), initial=done_samples, desc="cache", unit="img", disable=not cfg.progress)
    pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers > 0 else None
    try:
        for i in todo:
            gen = torch.Generator(device).manual_seed(cfg.seed + i) if cfg.latent_sampling == "sample" else None
            parts: list[dict[str, torch.Tensor]] = []
            captions, sources, shard_skipped, lengths = [], [], [], []
            for batch in load_batches(plan[i], cfg.batch_size, cfg.data.center_crop, pool,
                                       (cfg.num_frames, cfg.frame_stride) if video else None, reference):
                batch_px, batch_caps = [], []
                for r, px in batch:
                    if isinstance(px, BaseException):  # unreadable since the scan: skip and report
                        shard_skipped.append({"path": r.path, "reason": f"{type(px).__name__}: {px}"})
                        continue
                    batch_px.append(px)
                    batch_caps.append(r.caption)
                    sources.append(r.path)
                if batch_px:
                    refs = torch.stack([q for _, q in batch_px]) if reference else None  # Kontext: (image, ref)
                    px = torch.stack([p for p, _ in batch_px] if reference else batch_px)
                    tensors, batch_lengths = _encode_batch(pipe, family, px, batch_caps, cfg, text_len, device, gen,
                                                           refs)
                    parts.append(tensors)
                    captions += batch_caps
                    lengths += batch_lengths
                bar.update(len(batch))
            if not parts:
                skipped += shard_skipped
                continue
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            extra = {"prompt_lengths": lengths} if family in MASKED_FAMILIES else None
            writer.write_shard(i, tensors, captions, sources, shard_skipped, extra_meta=extra)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    bar.close()
    for e in writer.index["shards"]:
        skipped += e.get("skipped", [])
    writer.finish(len(plan), skipped)
    index = verify_cache(out, check_hash=False)
    for s in skipped:
        log.warning("skipped %s: %s", s["path"], s["reason"])
    return CacheResult(output_dir=str(out), num_samples=index["num_samples"], num_shards=len(index["shards"]),
                       shards_written=len(todo), shards_reused=reused, skipped=skipped,
                       validation_prompts=len(index.get("validation", {}).get("prompts", [])),
                       validation_written=need_validation)

