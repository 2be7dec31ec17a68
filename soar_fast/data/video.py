"""Video clips for `soar-fast cache` with a Wan pipeline: a folder of clips, each clip a video file
(`VIDEO_EXTENSIONS`: .mp4/.mov/.mkv/.webm/.avi decoded with PyAV, `pip install av`; animated .gif
with PIL) or a subfolder of frame images (PNG/JPG/..., in name order); its caption in `<clip>.txt`
beside it (`clip.mp4` -> `clip.txt`), `<clip>/caption.txt` inside a frame folder, or a
`metadata.jsonl`/`.csv` row whose file_name is the clip.

Every clip gives `num_frames` frames, every `frame_stride`-th from the first (Wan's VAE compresses
time 4x after the first frame, so `num_frames` is 4k + 1: 81 is the pipelines' default at 16 fps;
a 30 fps video at stride 2 is 15 fps), each resized and cropped as the images are
(`ImageFolderConfig.resolution`: a square crop, or with `aspect_buckets` the bucket of the clip's
aspect ratio), stacked to `[3, F, H, W]` in [-1, 1]. A clip with fewer frames is skipped and
reported, not padded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, ImageSequence

from soar_fast.config import ConfigError
from soar_fast.data.images import (
    IMAGE_EXTENSIONS,
    CaptionError,
    ImageFolderConfig,
    ImageRecord,
    ScanResult,
    SkippedFile,
    _read_metadata,
    folder_buckets,
    image_to_tensor,
    load_image,
    metadata_file,
    nearest_bucket,
    resize_center_crop,
)

__all__ = ["VIDEO_EXTENSIONS", "check_num_frames", "clip_frames", "frame_count", "holds_clips", "load_clip", "scan_clip_folder"]

#: Clip files (the rest of a clip folder's entries are frame subfolders); all but .gif need PyAV.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")

log = logging.getLogger(__name__)


def check_num_frames(n: int) -> str | None:
    """Why `n` frames do not suit Wan's VAE (None: they do)."""
    if n < 1 or (n - 1) % 4:
        lo = max(1, (n - 1) // 4 * 4 + 1)
        return f"need 4k + 1 frames (Wan's VAE compresses time 4x after the first frame), e.g. {lo} or {lo + 4}"
    return None


def holds_clips(cfg: ImageFolderConfig) -> bool:
    """Whether `cfg.root` looks like a folder of clips: a video file or a subfolder of frames, with its
    caption file (`_caption_file`; what an image pipeline given clips meant to cache)."""
    root = Path(cfg.root)
    return root.is_dir() and any(_is_clip(d) and _caption_file(cfg, d) for d in root.iterdir())


def _frames(clip: Path) -> list[Path]:
    return sorted(p for p in clip.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _is_video_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS


def _is_clip(p: Path) -> bool:
    return _is_video_file(p) or (p.is_dir() and bool(_frames(p)))


def _av(path: Path):
    try:
        import av
    except ImportError:
        raise ConfigError(f"reading {path} needs PyAV: pip install av (or soar-fast[video]), or give the clip as a "
                          "folder of frame images") from None
    return av


def frame_count(clip: Path) -> int:
    """How many frames the clip has (a video container's own count where it keeps one, else decoded)."""
    if clip.is_dir():
        return len(_frames(clip))
    if clip.suffix.lower() == ".gif":
        with Image.open(clip) as im:
            return getattr(im, "n_frames", 1)
    with _av(clip).open(str(clip)) as container:
        stream = container.streams.video[0]
        return stream.frames or sum(1 for _ in container.decode(stream))


def clip_frames(clip: Path, count: int, stride: int = 1) -> list[Image.Image]:
    """The clip's frames 0, stride, 2·stride, ... (`count` of them, RGB; fewer if it is shorter), from a
    frame folder, an animated GIF (PIL) or a video file (PyAV); decoding stops at the last one needed."""
    need = (count - 1) * stride + 1
    if clip.is_dir():
        return [load_image(f) for f in _frames(clip)[:need:stride]]
    if clip.suffix.lower() == ".gif":
        with Image.open(clip) as im:
            return [f.convert("RGB") for i, f in zip(range(need), ImageSequence.Iterator(im), strict=False)
                    if i % stride == 0]
    out = []
    with _av(clip).open(str(clip)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i >= need:
                break
            if i % stride == 0:
                out.append(frame.to_image().convert("RGB"))
    return out


def _caption_file(cfg: ImageFolderConfig, clip: Path) -> Path | None:
    """`<clip><ext>` beside the clip (a video's suffix replaced), else `caption<ext>` in its folder, else None."""
    beside = clip.with_suffix(cfg.caption_extension) if clip.is_file() else clip.parent / (clip.name + cfg.caption_extension)
    inside = [] if clip.is_file() else [clip / f"caption{cfg.caption_extension}"]
    return next((t for t in (beside, *inside) if t.is_file()), None)


def _caption(cfg: ImageFolderConfig, clip: Path) -> str | None:
    txt = _caption_file(cfg, clip)
    return None if txt is None else txt.read_text(encoding="utf-8").strip()


def scan_clip_folder(cfg: ImageFolderConfig, num_frames: int, frame_stride: int = 1) -> ScanResult:
    """The clips of `cfg.root` (sorted by path) with their captions, each in the bucket of its first frame
    (`cfg.aspect_buckets`: the nearest aspect ratio, as images; else the square of `cfg.resolution`)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"clip folder {root} does not exist")
    meta = metadata_file(cfg)
    if meta is not None:
        pairs = [(p, c) for p, c in _read_metadata(cfg, meta) if _is_clip(p)]
    else:
        pairs = [(d, _caption(cfg, d)) for d in sorted(root.iterdir()) if _is_clip(d)]
    if not pairs:
        images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file())
        hint = (" (it holds images: a Wan pipeline caches videos; put each clip's frames in a subfolder of "
                f"{root}, or cache the images with an image pipeline)" if images else "")
        raise FileNotFoundError(f"no clips found in {root}: each clip is a video file ({', '.join(VIDEO_EXTENSIONS)}) "
                                f"or a subfolder of frame images ({', '.join(IMAGE_EXTENSIONS)}){hint}")
    buckets = folder_buckets(cfg)
    need = (num_frames - 1) * frame_stride + 1
    records, skipped = [], []
    for clip, caption in sorted(pairs, key=lambda pc: str(pc[0])):
        if not caption:
            if not cfg.allow_empty_captions:
                raise CaptionError(f"{clip}: missing caption (no {_caption_name(cfg, clip)} beside it"
                                   f"{'' if clip.is_file() else f', no caption{cfg.caption_extension} in it'}); "
                                   "add one or set allow_empty_captions=True")
            caption = ""
        try:
            count = frame_count(clip)
            if count < need:
                stride = f" at --frame_stride {frame_stride} ({need})" if frame_stride > 1 else ""
                skipped.append(SkippedFile(str(clip), f"{count} frame(s), fewer than --num_frames {num_frames}{stride}"))
                continue
            size = clip_frames(clip, 1)[0].size
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure: skip and report
            skipped.append(SkippedFile(str(clip), f"{type(e).__name__}: {e}"))
            continue
        records.append(ImageRecord(str(clip), caption.strip(), size, nearest_bucket(*size, buckets)))
    for s in skipped:
        log.warning("skipping %s: %s", s.path, s.reason)
    if not records:
        raise FileNotFoundError(f"no usable clips in {root}; {len(skipped)} skipped ({skipped[0].reason})")
    return ScanResult(records=records, skipped=skipped, buckets=buckets)


def _caption_name(cfg: ImageFolderConfig, clip: Path) -> str:
    return clip.with_suffix(cfg.caption_extension).name if clip.is_file() else clip.name + cfg.caption_extension


def load_clip(r: ImageRecord, num_frames: int, frame_stride: int = 1, center_crop: bool = True) -> torch.Tensor:
    """The clip's `num_frames` frames (every `frame_stride`-th from the first) as `[3, F, H, W]` in [-1, 1]."""
    frames = clip_frames(Path(r.path), num_frames, frame_stride)
    if len(frames) < num_frames:
        raise ValueError(f"{len(frames)} frame(s) at stride {frame_stride}, fewer than --num_frames {num_frames}")
    return torch.stack([image_to_tensor(resize_center_crop(f, r.bucket, center_crop)) for f in frames], 1)
