"""Caption-folder image datasets: the layouts diffusers and SimpleTuner users already have.

Three layouts, detected in this order (or forced with `ImageFolderConfig.metadata`):
1. `metadata.jsonl` in the folder (diffusers ImageFolder): one JSON object per line with an image
   column (`file_name`, `image`, `image_path`, `path`) and a caption column (`text`, `caption`,
   `prompt`).
2. `metadata.csv` in the folder, same columns.
3. Sidecar captions (SimpleTuner / kohya): `cat.png` + `cat.txt`, searched recursively.

Images are resized so they cover a target bucket and center-cropped to it. Without aspect buckets
every image goes to the square `resolution x resolution`; with them, each image goes to the
bucket of nearest aspect ratio from a list of sizes of about `resolution**2` pixels, and batches
are drawn within one bucket. Unreadable images are skipped and reported (`SkippedFile`); a
missing caption raises `CaptionError` unless `allow_empty_captions`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from soar_fast.config import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionError",
    "CaptionImageDataset",
    "ImageFolderConfig",
    "ImageRecord",
    "ScanResult",
    "SkippedFile",
    "image_to_tensor",
    "load_image",
    "folder_buckets",
    "make_buckets",
    "nearest_bucket",
    "resize_center_crop",
    "scan_image_folder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("file_name", "image", "image_path", "path", "filename")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")


class CaptionError(ValueError):
    """An image has no caption (and `allow_empty_captions` is off), or the metadata is unusable."""


@dataclass(kw_only=True)
class ImageFolderConfig:
    """Where the images and captions are, and how they become training-size tensors."""

    root: str
    """Folder with the images (searched recursively for sidecar captions)."""
    metadata: str | None = None
    """A `.jsonl` or `.csv` of image path + caption (paths relative to `root`). None: use
    `root/metadata.jsonl` or `root/metadata.csv` when present, else sidecar `.txt` captions."""
    image_column: str | None = None
    """Metadata column with the image path. None: the first of file_name, image, image_path, path."""
    caption_column: str | None = None
    """Metadata column with the caption. None: the first of text, caption, prompt."""
    caption_extension: str = ".txt"
    """Extension of sidecar caption files."""
    allow_empty_captions: bool = False
    """Train images without a caption on the empty prompt instead of raising `CaptionError`."""
    resolution: int = 512
    """Target side in pixels: square crops, or buckets of about resolution**2 pixels."""
    aspect_buckets: bool = False
    """Group images into aspect-ratio buckets instead of square center crops."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (VAE factor x patch size at least; 64 is safe for SD3)."""
    max_aspect_ratio: float = 2.0
    """Widest (and tallest) bucket allowed, as long side / short side."""
    center_crop: bool = True
    """Center crop after resizing; False takes the top-left crop (as diffusers' `--center_crop` off)."""
    verify_decode: bool = False
    """Decode every image fully while scanning. Off: the scan reads headers only, and an image that
    fails to decode later (truncated data) is skipped and reported by the cache step instead."""

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ConfigError(f"ImageFolderConfig.resolution={self.resolution} is invalid: need >= 8 pixels")
        if self.bucket_step < 1 or (self.aspect_buckets and self.bucket_step > self.resolution):
            raise ConfigError(
                f"ImageFolderConfig.bucket_step={self.bucket_step} is invalid: need 1 <= step <= resolution"
            )
        if self.max_aspect_ratio < 1:
            raise ConfigError(f"ImageFolderConfig.max_aspect_ratio={self.max_aspect_ratio} is invalid: need >= 1")


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: its path, caption, original size and training size `(height, width)`."""

    path: str
    caption: str
    size: tuple[int, int]  # (width, height) as PIL reports it
    bucket: tuple[int, int]  # (height, width) of the crop
    reference_bucket: tuple[int, int] | None = None  # FLUX.1 Kontext: the input image's crop (None: `bucket`)


@dataclass(frozen=True)
class SkippedFile:
    """An image left out, with the reason (unreadable, truncated, not an image)."""

    path: str
    reason: str


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[SkippedFile]
    buckets: list[tuple[int, int]]


def make_buckets(resolution: int, step: int = 64, max_aspect_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets with sides multiple of `step`, area <= resolution**2 and as close to
    it as the step allows, aspect within `max_aspect_ratio`. Always includes the square."""
    area = resolution * resolution
    side = max(step, resolution // step * step)
    buckets = {(side, side)}
    w = step
    while w <= resolution * max_aspect_ratio:
        h = max(step, area // w // step * step)
        if max(h, w) / min(h, w) <= max_aspect_ratio + 1e-9:
            buckets.add((h, w))
            buckets.add((w, h))
        w += step
    return sorted(buckets, key=lambda hw: (hw[1] / hw[0], hw[0]))


def folder_buckets(cfg: ImageFolderConfig) -> list[tuple[int, int]]:
    """The (height, width) crops of a folder's images or clips: `make_buckets` with aspect buckets, else the square."""
    if cfg.aspect_buckets:
        return make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)
    return [(cfg.resolution, cfg.resolution)]


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to the image's."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), -hw[0] * hw[1]))


def resize_center_crop(img: Image.Image, size: tuple[int, int], center: bool = True) -> Image.Image:
    """Resize (bicubic) so the image covers `size=(height, width)`, then crop to it."""
    th, tw = size
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = ((nw - tw) // 2, (nh - th) // 2) if center else (0, 0)
    return img.crop((left, top, left + tw, top + th))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 `[3, H, W]` in [-1, 1], the VAE's input range."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (raises on truncated or corrupt data)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _probe(path: Path, decode: bool) -> tuple[int, int]:
    """(width, height) from the header (and a full decode if `decode`); raises on a bad image."""
    with Image.open(path) as im:
        size = im.size
        if decode:
            im.load()  # verify() misses truncated pixel data; a full decode does not
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"empty image {size}")
    return size


def _pick(columns: Sequence[str], wanted: str | None, choices: Sequence[str], what: str, src: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise CaptionError(f"{src}: no column {wanted!r} ({what}); columns are {list(columns)}")
        return wanted
    for c in choices:
        if c in columns:
            return c
    raise CaptionError(
        f"{src}: no {what} column; name one of {', '.join(choices)} or set the {what} column option"
    )


def _read_metadata(cfg: ImageFolderConfig, meta: Path) -> list[tuple[Path, str | None]]:
    root = Path(cfg.root)
    if meta.suffix == ".jsonl":
        rows = []
        with meta.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise CaptionError(f"{meta}:{i}: not valid JSON ({e.msg})") from None
    elif meta.suffix == ".csv":
        with meta.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise CaptionError(f"{meta}: metadata must be a .jsonl or .csv file")
    if not rows:
        raise CaptionError(f"{meta}: no rows")
    columns = list(rows[0].keys())
    icol = _pick(columns, cfg.image_column, IMAGE_COLUMNS, "image", meta)
    ccol = _pick(columns, cfg.caption_column, CAPTION_COLUMNS, "caption", meta)
    out = []
    for row in rows:
        cap = row.get(ccol)
        if isinstance(cap, list):  # diffusers allows several captions; the first is used
            cap = cap[0] if cap else None
        p = Path(str(row[icol]))
        out.append((p if p.is_absolute() else root / p, None if cap is None else str(cap)))
    return out


def _read_sidecars(cfg: ImageFolderConfig) -> list[tuple[Path, str | None]]:
    out = []
    for p in sorted(Path(cfg.root).rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            txt = p.with_suffix(cfg.caption_extension)
            out.append((p, txt.read_text(encoding="utf-8").strip() if txt.is_file() else None))
    return out


def metadata_file(cfg: ImageFolderConfig) -> Path | None:
    """`cfg.metadata` (relative to the root unless it exists as given), else `root/metadata.jsonl` or
    `root/metadata.csv` when present, else None (sidecar captions)."""
    root = Path(cfg.root)
    meta = Path(cfg.metadata) if cfg.metadata else None
    if meta is None:
        return next((root / n for n in ("metadata.jsonl", "metadata.csv") if (root / n).is_file()), None)
    return root / meta if not meta.is_absolute() and not meta.is_file() else meta


def scan_image_folder(cfg: ImageFolderConfig) -> ScanResult:
    """List the images and captions of a folder, probe each image, assign buckets.

    Records come sorted by path (a deterministic order, so caching can resume). Unreadable images
    are skipped and reported in `ScanResult.skipped` (headers only unless `cfg.verify_decode`); a missing or empty caption raises
    `CaptionError` naming the file, unless `cfg.allow_empty_captions`.
    """
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    meta = metadata_file(cfg)
    pairs = _read_metadata(cfg, meta) if meta is not None else _read_sidecars(cfg)
    if not pairs:
        raise FileNotFoundError(f"no images found in {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")

    buckets = folder_buckets(cfg)
    records, skipped = [], []
    for path, caption in sorted(pairs, key=lambda pc: str(pc[0])):
        if not caption or not caption.strip():
            if not cfg.allow_empty_captions:
                where = f"no {cfg.caption_extension} file beside it" if meta is None else f"empty in {meta}"
                raise CaptionError(
                    f"{path}: missing caption ({where}); add one or set allow_empty_captions=True"
                )
            caption = ""
        try:
            size = _probe(path, cfg.verify_decode)
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip and report
            skipped.append(SkippedFile(str(path), f"{type(e).__name__}: {e}"))
            continue
        records.append(ImageRecord(str(path), caption.strip(), size, nearest_bucket(*size, buckets)))
    for s in skipped:
        log.warning("skipping %s: %s", s.path, s.reason)
    if not records:
        raise FileNotFoundError(f"no readable images in {root}; {len(skipped)} skipped")
    return ScanResult(records=records, skipped=skipped, buckets=buckets)


class CaptionImageDataset(torch.utils.data.Dataset):
    """Records -> dicts `{"pixel_values": [3, H, W] in [-1, 1], "caption": str, "path": str}`,
    each at its record's bucket size (batch one bucket's records together so a batch shares a size)."""

    def __init__(self, records: Sequence[ImageRecord], center_crop: bool = True):
        self.records = list(records)
        self.center_crop = center_crop

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        img = resize_center_crop(load_image(r.path), r.bucket, self.center_crop)
        return {"pixel_values": image_to_tensor(img), "caption": r.caption, "path": r.path}
