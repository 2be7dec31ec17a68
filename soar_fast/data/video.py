"""Video clips for `soar-fast cache` with a Wan pipeline: a folder of clips, each clip a subfolder of
frame images (PNG/JPG/..., in name order), its caption in `<clip>.txt` beside the subfolder,
`<clip>/caption.txt` inside it, or a `metadata.jsonl`/`.csv` row whose file_name is the clip folder.

Every clip gives its first `num_frames` frames (Wan's VAE compresses time 4x after the first frame,
so `num_frames` is 4k + 1: 81 is the pipelines' default, 17 or 33 fit smaller GPUs), each resized
and cropped as the images are (`ImageFolderConfig.resolution`, a square crop), stacked to
`[3, F, H, W]` in [-1, 1]. A clip with fewer frames is skipped and reported, not padded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from soar_fast.data.images import (
    IMAGE_EXTENSIONS,
    CaptionError,
    ImageFolderConfig,
    ImageRecord,
    ScanResult,
    SkippedFile,
    _read_metadata,
    image_to_tensor,
    load_image,
    metadata_file,
    resize_center_crop,
)

__all__ = ["check_num_frames", "holds_clips", "load_clip", "scan_clip_folder"]

log = logging.getLogger(__name__)


def check_num_frames(n: int) -> str | None:
    """Why `n` frames do not suit Wan's VAE (None: they do)."""
    if n < 1 or (n - 1) % 4:
        lo = max(1, (n - 1) // 4 * 4 + 1)
        return f"need 4k + 1 frames (Wan's VAE compresses time 4x after the first frame), e.g. {lo} or {lo + 4}"
    return None


def holds_clips(cfg: ImageFolderConfig) -> bool:
    """Whether `cfg.root` looks like a folder of clips: a subfolder of frames with its caption file
    (`_caption_file`; what an image pipeline given clips meant to cache)."""
    root = Path(cfg.root)
    return root.is_dir() and any(d.is_dir() and _frames(d) and _caption_file(cfg, d) for d in root.iterdir())


def _frames(clip: Path) -> list[Path]:
    return sorted(p for p in clip.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _caption_file(cfg: ImageFolderConfig, clip: Path) -> Path | None:
    """`<clip><ext>` beside the clip's folder, else `caption<ext>` in it, else None."""
    return next((t for t in (clip.parent / (clip.name + cfg.caption_extension), clip / f"caption{cfg.caption_extension}")
                 if t.is_file()), None)


def _caption(cfg: ImageFolderConfig, clip: Path) -> str | None:
    txt = _caption_file(cfg, clip)
    return None if txt is None else txt.read_text(encoding="utf-8").strip()


def scan_clip_folder(cfg: ImageFolderConfig, num_frames: int) -> ScanResult:
    """The clips of `cfg.root` (sorted by path) with their captions; one square bucket of `cfg.resolution`."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"clip folder {root} does not exist")
    meta = metadata_file(cfg)
    if meta is not None:
        pairs = [(p, c) for p, c in _read_metadata(cfg, meta) if p.is_dir()]
    else:
        pairs = [(d, _caption(cfg, d)) for d in sorted(root.iterdir()) if d.is_dir() and _frames(d)]
    if not pairs:
        images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file())
        hint = (" (it holds images: a Wan pipeline caches videos; put each clip's frames in a subfolder of "
                f"{root}, or cache the images with an image pipeline)" if images else "")
        raise FileNotFoundError(f"no clips found in {root}: each clip is a subfolder of frame images "
                                f"({', '.join(IMAGE_EXTENSIONS)}){hint}")
    bucket = (cfg.resolution, cfg.resolution)
    records, skipped = [], []
    for clip, caption in sorted(pairs, key=lambda pc: str(pc[0])):
        if not caption:
            if not cfg.allow_empty_captions:
                raise CaptionError(f"{clip}: missing caption (no {clip.name}{cfg.caption_extension} beside it, no "
                                   f"caption{cfg.caption_extension} in it); add one or set allow_empty_captions=True")
            caption = ""
        frames = _frames(clip)
        if len(frames) < num_frames:
            skipped.append(SkippedFile(str(clip), f"{len(frames)} frame(s), fewer than --num_frames {num_frames}"))
            continue
        try:
            size = load_image(frames[0]).size
        except Exception as e:  # noqa: BLE001 - any decoder failure: skip and report
            skipped.append(SkippedFile(str(clip), f"{type(e).__name__}: {e}"))
            continue
        records.append(ImageRecord(str(clip), caption.strip(), size, bucket))
    for s in skipped:
        log.warning("skipping %s: %s", s.path, s.reason)
    if not records:
        raise FileNotFoundError(f"no usable clips in {root}; {len(skipped)} skipped ({skipped[0].reason})")
    return ScanResult(records=records, skipped=skipped, buckets=[bucket])


def load_clip(r: ImageRecord, num_frames: int, center_crop: bool) -> torch.Tensor:
    """The clip's first `num_frames` frames as `[3, F, H, W]` in [-1, 1]."""
    frames = _frames(Path(r.path))[:num_frames]
    if len(frames) < num_frames:
        raise ValueError(f"{len(frames)} frame(s), fewer than --num_frames {num_frames}")
    return torch.stack([image_to_tensor(resize_center_crop(load_image(f), r.bucket, center_crop)) for f in frames], 1)
