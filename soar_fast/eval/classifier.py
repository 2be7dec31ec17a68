"""A small digits classifier, trained once on real digits and cached; its penultimate layer is the
feature space of the Frechet distance (the FID analogue) and its argmax the accuracy judge (the
GenEval analogue)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from soar_fast.data import load_digits_tensors

__all__ = ["DigitsClassifier", "load_or_train_classifier", "split_indices"]

_VERSION = 1


class DigitsClassifier(nn.Module):
    """MLP: pixels `[N, 1, R, R]` -> features `[N, 64]` -> logits `[N, 10]`."""

    def __init__(self, resolution: int = 8, width: int = 256, feat: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(resolution * resolution, width), nn.ReLU(),
                                  nn.Linear(width, feat), nn.ReLU())
        self.head = nn.Linear(feat, classes)
        self.resolution = resolution

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_indices(n: int, seed: int = 0, held_out: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) row indices of a fixed random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * held_out))
    return perm[k:], perm[:k]


@torch.enable_grad()
def _train(resolution: int, seed: int, epochs: int = 60) -> tuple[DigitsClassifier, float]:
    # One thread: a 64-row MLP gains nothing from two, and on a shared machine a second spinning
    # OpenMP thread slows it down by an order of magnitude.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_mlp(resolution, seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _train_mlp(resolution: int, seed: int, epochs: int) -> tuple[DigitsClassifier, float]:
    x, y = load_digits_tensors(resolution)
    tr, te = split_indices(len(x), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitsClassifier(resolution)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            xb = x[b] + 0.1 * torch.randn(x[b].shape, generator=g)  # mild noise: robust to sampler grain
            loss = nn.functional.cross_entropy(clf(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x[te]).argmax(1) == y[te]).float().mean().item()
    return clf, acc


def load_or_train_classifier(cache_dir: str | Path, resolution: int = 8, seed: int = 0) -> tuple[DigitsClassifier, dict]:
    """The classifier cached in `cache_dir` (trained and written there on first use) and its meta
    (`held_out_accuracy`: accuracy on real digits it never saw, the reference for generated ones)."""
    cache = Path(cache_dir)
    wfile, mfile = cache / "classifier.safetensors", cache / "classifier.json"
    if wfile.exists() and mfile.exists():
        try:
            meta = json.loads(mfile.read_text())
            if meta.get("version") == _VERSION and meta.get("resolution") == resolution and meta.get("seed") == seed:
                clf = DigitsClassifier(resolution)
                clf.load_state_dict(load_file(str(wfile)))
                return clf.eval(), meta
        except Exception:  # noqa: BLE001 - a bad cache is retrained
            pass
    clf, acc = _train(resolution, seed)
    meta = {"version": _VERSION, "resolution": resolution, "seed": seed, "held_out_accuracy": acc}
    cache.mkdir(parents=True, exist_ok=True)
    save_file(clf.state_dict(), str(cache / "classifier.tmp.safetensors"))
    (cache / "classifier.tmp.safetensors").replace(wfile)
    mfile.write_text(json.dumps(meta))
    return clf, meta
