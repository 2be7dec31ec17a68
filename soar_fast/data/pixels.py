"""Decoding `soar-fast cache`'s inputs: images (and FLUX.1 Kontext references) or clips to pixel tensors
in [-1, 1], in batches, decoded in threads ahead of the encoders."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from soar_fast.data.images import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    image_to_tensor,
    load_image,
    resize_center_crop,
)
from soar_fast.data.video import load_clip

__all__ = ["load_batches", "load_pixels", "load_resized", "reference_file"]


def reference_file(r: ImageRecord, root: str, reference_root: str) -> Path:
    """The reference image of record r: the same path relative to `root` under `reference_root`, any image extension."""
    rel = Path(r.path).resolve().relative_to(Path(root).resolve())
    for ext in dict.fromkeys((rel.suffix, *IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS))):
        if (q := Path(reference_root) / rel.with_suffix(ext)).is_file():
            return q
    raise FileNotFoundError(f"no reference image {Path(reference_root) / rel.with_suffix('.*')} for it")


def load_resized(path: str | Path, size: tuple[int, int], center_crop: bool) -> torch.Tensor:
    """The image at `path` resized and cropped to `size = (height, width)`, `[3, h, w]` in [-1, 1]."""
    return image_to_tensor(resize_center_crop(load_image(path), size, center_crop))


def load_pixels(r: ImageRecord, center_crop: bool, clip: tuple[int, int] | None = None,
                 reference: tuple[str, str] | None = None) -> torch.Tensor | tuple | BaseException:
    """Pixels [3, h, w] (with `clip = (num_frames, frame_stride)`, a video clip: [3, F, h, w]; with
    `reference = (root, reference_root)`: the pair (image [3, h, w], its reference [3, h', w'] at
    `r.reference_bucket`, else at the image's size)), or the error that stops them."""
    try:
        if clip is not None:  # a video clip: [3, F, h, w]
            return load_clip(r, *clip, center_crop=center_crop)
        px = load_resized(r.path, r.bucket, center_crop)
        if reference is None:
            return px
        return px, load_resized(reference_file(r, *reference), r.reference_bucket or r.bucket, center_crop)
    except Exception as e:  # noqa: BLE001 - any decoder failure: the caller skips and reports
        return e


def load_batches(
    records: list[ImageRecord], batch_size: int, center_crop: bool, pool: ThreadPoolExecutor | None,
    clip: tuple[int, int] | None = None, reference: tuple[str, str] | None = None,
) -> Iterator[list[tuple[ImageRecord, torch.Tensor | tuple | BaseException]]]:
    """Batches of (record, pixels [3, h, w] (clips: [3, F, h, w]; Kontext: (image, reference)) or the load
    error); with a pool, the next two batches decode in threads while the current one is encoded (PIL
    releases the GIL)."""
    batches = [records[s : s + batch_size] for s in range(0, len(records), batch_size)]
    if pool is None:
        for b in batches:
            yield [(r, load_pixels(r, center_crop, clip, reference)) for r in b]
        return
    pending: deque = deque()
    for b in batches:
        pending.append((b, [pool.submit(load_pixels, r, center_crop, clip, reference) for r in b]))
        if len(pending) > 2:
            rb, futs = pending.popleft()
            yield list(zip(rb, (f.result() for f in futs), strict=True))
    while pending:
        rb, futs = pending.popleft()
        yield list(zip(rb, (f.result() for f in futs), strict=True))
