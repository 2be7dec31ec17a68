"""Sharded safetensors caches of (latents, prompt_embeds, pooled), with a checked index.

Layout of a cache folder:
```
index.json                  format, producer info, shards (file, num_samples, tensors with shape
                            and dtype, sha256), skipped files, complete flag
empty_prompt.safetensors    the empty-prompt condition, once: prompt_embeds [L, D], pooled [P]
shard-00000.safetensors     latents [n, C, h, w], prompt_embeds [n, L, D], pooled [n, P]; its
...                         safetensors metadata holds the captions and source paths (JSON)
```
Captions live in the shards, not the index, so the index stays small (it is rewritten after every
shard) and each shard, checksum included, describes itself.
Each shard holds one latent shape (one aspect bucket). Files are written to a temporary name and
renamed, and the index is rewritten after every shard, so an interrupted run leaves a valid prefix
that `soar_fast.data.cache.run_cache` resumes from. `verify_cache` checks every shard against the
index (existence, shapes, dtypes, sha256) and raises `ShardError` naming the shard and the fix.
Training reads the rows through `soar_fast.data.latents.LatentsDataset` and the trainer's one
batch stream (`soar_fast.data.loader.BatchStream`: a DataLoader over the resumable sampler).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "EMPTY_PROMPT_FILE",
    "FORMAT",
    "INDEX_FILE",
    "REFERENCE",
    "TENSOR_NAMES",
    "ShardDataset",
    "ShardError",
    "ShardWriter",
    "file_sha256",
    "load_empty_prompt",
    "read_index",
    "verify_cache",
    "verify_shard",
]

FORMAT = "soar_fast.shards/1"
INDEX_FILE = "index.json"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
TENSOR_NAMES = ("latents", "prompt_embeds", "pooled")
#: An optional per-sample tensor: FLUX.1 Kontext's reference-image latents `[C, h, w]` (all shards or none).
REFERENCE = "reference"
FIX = "delete it (or the cache folder) and re-run `soar-fast cache` with the same arguments"

Verify = Literal["none", "shape", "hash"]


class ShardError(RuntimeError):
    """A cache shard is missing, truncated, or disagrees with index.json. The message names it."""


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensor_info(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": _dtype_name(v)} for k, v in tensors.items()}


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def read_index(cache_dir: str | Path) -> dict[str, Any]:
    """The parsed index.json of a cache folder; `ShardError` if absent or of another format."""
    path = Path(cache_dir) / INDEX_FILE
    if not path.is_file():
        raise ShardError(f"{path} not found: {cache_dir} is not a soar_fast cache; run `soar-fast cache` first")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e.msg}); {FIX}") from None
    if index.get("format") != FORMAT:
        raise ShardError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}; {FIX}")
    return index


class ShardWriter:
    """Writes shards and the index. `fingerprint` identifies the producer settings: reopening a
    folder whose index has another fingerprint raises instead of mixing two caches."""

    def __init__(self, cache_dir: str | Path, fingerprint: str, info: dict[str, Any] | None = None):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / INDEX_FILE).is_file():
            self.index = read_index(self.dir)
            if self.index.get("fingerprint") != fingerprint:
                raise ShardError(
                    f"{self.dir} holds a cache made with other settings (fingerprint "
                    f"{self.index.get('fingerprint')} != {fingerprint}); use another output folder, or resume=False to rebuild it"
                )
        else:
            self.index = {"format": FORMAT, "fingerprint": fingerprint, "info": info or {}, "shards": [],
                          "empty_prompt": None, "skipped": [], "complete": False}
        self.index["info"] = {**self.index.get("info", {}), **(info or {})}

    def shard_name(self, i: int) -> str:
        return f"shard-{i:05d}.safetensors"

    def entry(self, i: int) -> dict[str, Any] | None:
        return next((s for s in self.index["shards"] if s["id"] == i), None)

    def is_done(self, i: int, check_hash: bool = True) -> bool:
        """True when shard i is in the index and its file verifies (so a resume can skip it)."""
        e = self.entry(i)
        if e is None:
            return False
        try:
            verify_shard(self.dir, e, check_hash=check_hash)
        except ShardError:
            return False
        return True

    def is_done_empty(self, check_hash: bool = True) -> bool:
        """True when the empty-prompt file is recorded and verifies."""
        e = self.index.get("empty_prompt")
        if e is None:
            return False
        try:
            verify_shard(self.dir, e, check_hash=check_hash)
        except ShardError:
            return False
        return True

    def write_shard(
        self, i: int, tensors: dict[str, torch.Tensor], captions: Sequence[str], sources: Sequence[str],
        skipped: Sequence[dict[str, str]] = (), extra_meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write shard i (`tensors` with the names of TENSOR_NAMES, batched on dim 0) and record it.
        `extra_meta`: more per-shard metadata (JSON values), e.g. `prompt_lengths` (one int a sample)."""
        names = set(tensors) - {REFERENCE}
        if names != set(TENSOR_NAMES) or {v.shape[0] for v in tensors.values()} != {len(captions)}:
            raise ValueError(f"shard {i}: need {TENSOR_NAMES} with one batch size matching captions, got "
                             f"{ {k: tuple(v.shape) for k, v in tensors.items()} } and {len(captions)} captions")
        name = self.shard_name(i)
        meta = {"captions": json.dumps(list(captions)), "sources": json.dumps(list(sources))}
        meta.update({k: json.dumps(v) for k, v in (extra_meta or {}).items()})
        digest = _save_atomic(tensors, self.dir / name, meta)
        entry = {"id": i, "file": name, "num_samples": len(captions), "tensors": _tensor_info(tensors),
                 "sha256": digest, "skipped": list(skipped)}
        self.index["shards"] = sorted([s for s in self.index["shards"] if s["id"] != i] + [entry],
                                      key=lambda s: s["id"])
        self.flush()
        return entry

    def write_empty_prompt(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        """The empty-prompt condition of one sample: prompt_embeds [L, D], pooled [P]."""
        tensors = {"prompt_embeds": prompt_embeds.reshape(prompt_embeds.shape[-2:]), "pooled": pooled.reshape(-1)}
        digest = _save_atomic(tensors, self.dir / EMPTY_PROMPT_FILE)
        self.index["empty_prompt"] = {"file": EMPTY_PROMPT_FILE, "tensors": _tensor_info(tensors), "sha256": digest}
        self.flush()

    def finish(self, num_shards: int, skipped: Sequence[dict[str, str]] = ()) -> None:
        """Drop index entries past `num_shards`, record skipped files, mark the cache complete."""
        self.index["shards"] = [s for s in self.index["shards"] if s["id"] < num_shards]
        self.index["skipped"] = list(skipped)
        self.index["num_samples"] = sum(s["num_samples"] for s in self.index["shards"])
        self.index["complete"] = True
        self.flush()

    def flush(self) -> None:
        _atomic_write_json(self.dir / INDEX_FILE, self.index)


def verify_shard(cache_dir: str | Path, entry: dict[str, Any], check_hash: bool = True) -> None:
    """Check one shard (or the empty-prompt file) against its index entry; `ShardError` if not."""
    path = Path(cache_dir) / entry["file"]
    if not path.is_file():
        raise ShardError(f"shard {path} listed in index.json is missing; {FIX}")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: {"shape": list(f.get_slice(k).get_shape()), "dtype": _slice_dtype(f.get_slice(k))}
                     for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged header
        raise ShardError(f"shard {path} is unreadable ({type(e).__name__}: {e}); {FIX}") from None
    if found != entry["tensors"]:
        raise ShardError(f"shard {path} holds {found} but index.json says {entry['tensors']}; {FIX}")
    if check_hash and file_sha256(path) != entry["sha256"]:
        raise ShardError(f"shard {path} fails its sha256 checksum (file changed or truncated); {FIX}")


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _slice_dtype(sl: Any) -> str:
    d = sl.get_dtype()
    return _ST_DTYPES.get(d, str(d).lower())


def verify_cache(cache_dir: str | Path, check_hash: bool = True, require_complete: bool = True) -> dict[str, Any]:
    """Verify every shard and the empty-prompt file of a cache; returns the index."""
    index = read_index(cache_dir)
    if require_complete and not index.get("complete"):
        raise ShardError(f"cache {cache_dir} is incomplete (interrupted?); re-run `soar-fast cache` to finish it")
    if index.get("empty_prompt") is None:
        raise ShardError(f"cache {cache_dir} has no empty-prompt embedding; re-run `soar-fast cache`")
    verify_shard(cache_dir, index["empty_prompt"], check_hash)
    shapes = set()
    for e in index["shards"]:
        verify_shard(cache_dir, e, check_hash)
        shapes.add(tuple(tuple(e["tensors"][k]["shape"][1:]) for k in ("prompt_embeds", "pooled")))
    if len(shapes) > 1:
        raise ShardError(f"cache {cache_dir}: shards disagree on text-embedding shapes {sorted(shapes)}; {FIX}")
    if len({REFERENCE in e["tensors"] for e in index["shards"]}) > 1:
        raise ShardError(f"cache {cache_dir}: some shards hold reference latents and some do not; {FIX}")
    return index


def load_empty_prompt(cache_dir: str | Path, check_hash: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty-prompt condition `(prompt_embeds [L, D], pooled [P])`, the `uncond` of soar_loss."""
    index = read_index(cache_dir)
    if index.get("empty_prompt") is None:
        raise ShardError(f"cache {cache_dir} has no empty-prompt embedding; re-run `soar-fast cache`")
    verify_shard(cache_dir, index["empty_prompt"], check_hash)
    with safe_open(str(Path(cache_dir) / EMPTY_PROMPT_FILE), framework="pt") as f:
        return f.get_tensor("prompt_embeds"), f.get_tensor("pooled")


class ShardDataset(torch.utils.data.Dataset):
    """Sample i of the cache -> `(latents [C, h, w], prompt_embeds [L, D], pooled [P])`.

    Shards are memory-mapped lazily in each process: a forked DataLoader worker drops the handles it
    inherited and opens its own (and a pickled copy carries none), so workers never share one.
    `verify`: "hash" checks sha256 of every shard at construction, "shape" only shapes and dtypes.
    """

    def __init__(self, cache_dir: str | Path, verify: Verify = "shape"):
        self.dir = Path(cache_dir)
        self.index = (verify_cache(self.dir, check_hash=verify == "hash") if verify != "none"
                      else read_index(self.dir))
        self.locate: list[tuple[int, int]] = []
        for si, e in enumerate(self.index["shards"]):
            self.locate += [(si, r) for r in range(e["num_samples"])]
        #: FLUX.1 Kontext caches: every sample has reference-image latents (`reference(i)`)
        self.has_reference = bool(self.index["shards"]) and REFERENCE in self.index["shards"][0]["tensors"]
        #: per sample, the shapes a batch must share: its latents' (a Kontext cache: and its reference's)
        self.keys = [tuple(s for k in ("latents", REFERENCE)[: 1 + self.has_reference]
                           for s in self.index["shards"][si]["tensors"][k]["shape"][1:]) for si, _ in self.locate]
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._meta_cache: dict[tuple[int, str], list[str]] = {}

    def __len__(self) -> int:
        return len(self.locate)

    def _handle(self, si: int) -> Any:
        if self._pid != os.getpid():  # a forked worker: the parent's handles stay the parent's
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(si)
        if f is None:
            f = self._handles[si] = safe_open(str(self.dir / self.index["shards"][si]["file"]), framework="pt")
        return f

    def _meta(self, si: int, key: str) -> list[str]:
        if (si, key) not in self._meta_cache:
            self._meta_cache[si, key] = json.loads(self._handle(si).metadata()[key])
        return self._meta_cache[si, key]

    def caption(self, i: int) -> str:
        """The caption sample i was encoded from."""
        si, r = self.locate[i]
        return self._meta(si, "captions")[r]

    def source(self, i: int) -> str:
        """The image file sample i was encoded from."""
        si, r = self.locate[i]
        return self._meta(si, "sources")[r]

    def prompt_length(self, i: int) -> int | None:
        """Valid tokens of sample i's prompt_embeds (the rest is zero padding), for the caches that
        record them (Z-Image, Qwen-Image: `soar_fast.data.encoders`); None otherwise."""
        si, r = self.locate[i]
        if "prompt_lengths" not in (self._handle(si).metadata() or {}):
            return None
        return int(self._meta(si, "prompt_lengths")[r])

    def reference(self, i: int) -> torch.Tensor:
        """Sample i's reference-image latents `[C, h, w]` (a Kontext cache: `has_reference`)."""
        si, r = self.locate[i]
        return self._handle(si).get_slice(REFERENCE)[r]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        si, r = self.locate[i]
        f = self._handle(si)
        return tuple(f.get_slice(k)[r] for k in TENSOR_NAMES)  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:  # handles do not pickle (spawned workers)
        return {**self.__dict__, "_handles": {}}
