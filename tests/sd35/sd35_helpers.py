"""Shared helpers of the sd35 tests. A module of its own (not conftest) so that test modules can
import it by a unique name: several test folders have a conftest.py, and `from conftest import`
would pick whichever was imported last."""

from pathlib import Path

import numpy as np
from PIL import Image

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
CAPTIONS = ["a red square", "a green field", "a blue sky", "a yellow sun", "a black cat", "a white dog"]


def tiny_vocabs() -> tuple[dict[str, int], list[tuple[str, float]]]:
    """The in-test vocabularies of the tiny tokenizers: a CLIP BPE vocab (no merges) and a T5
    unigram vocab over CHARS (transformers builds CLIPTokenizer/T5Tokenizer from these directly)."""
    clip = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        clip[c] = len(clip)
        clip[c + "</w>"] = len(clip)
    t5 = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    t5 += [(c, -3.0) for c in CHARS] + [("▁" + c, -3.5) for c in CHARS]
    return clip, t5


def write_image(path: Path, size=(32, 32), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_caption_folder(root: Path, n: int = 6, sizes=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = sizes[i] if sizes else (32, 32)
        write_image(root / f"img{i:02d}.png", size, seed=i)
        (root / f"img{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)], encoding="utf-8")
    return root
