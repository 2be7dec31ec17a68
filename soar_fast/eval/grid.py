"""Image grids as PNG (PIL) and as TensorBoard images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["make_grid", "save_png"]


def make_grid(images: torch.Tensor, nrow: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """`[N, C, H, W]` in [-1, 1] -> uint8 `[H', W', 3]`, `nrow` images per row, upscaled by `scale`
    (nearest) with a `pad`-pixel white border."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write uint8 `[H, W, 3]` as a PNG (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
    return path
