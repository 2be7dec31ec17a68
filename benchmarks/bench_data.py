"""Shard read throughput through the trainer's own batch stream, on the CPU, against the step's needs.

Writes a cache of SD3.5-shaped 512 px rows with the real `ShardWriter` (latents [16, 64, 64],
prompt_embeds [333, 4096] = 77 CLIP + 256 T5 tokens as `soar-fast cache` writes by default,
pooled [2048], all bfloat16 like its default `store_dtype`; random values, no VAE, no download),
opens it as the trainer does (`LatentsDataset`: shapes and sha256 checked once) and times
`BatchStream` (soar_fast.data.loader: the DataLoader over the resumable sampler, the trainer's
data path) for each `--workers` value: samples/s over `--batches` batches after `--warmup`
batches (worker start-up excluded, reported as its own row), the median of `--repeats` runs. The
consumer only touches every page of each batch (as the copy to the device would), so the number
is what the data path can feed. The goal: more than `--target_factor` (10) times the
per-GPU sample rate the step benchmark measured (`--step_rate`, 7.8 samples/s at 512 px on an
H200, benchmarks/results/h200/2026-11-26/step_512.json), so reading never starves a step.

The shard files are freshly written, so they sit in the OS page cache (`--page_cache warm`: a
cache that fits in RAM, or one read before); `cold` asks the kernel to drop the files' cached
pages before each measurement (posix_fadvise DONTNEED) for a disk-bound number; the default
`--rows` are more than one measurement reads, so no row is read twice in it.

  python benchmarks/bench_data.py --out benchmarks/results/cpu/2026-12-03/bench_data.json
  python benchmarks/bench_data.py --smoke --out /tmp/data.json      # tiny rows, seconds
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_lib as lib  # noqa: E402

from soar_fast.data.latents import LatentsDataset  # noqa: E402
from soar_fast.data.loader import BatchStream, ResumableSampler  # noqa: E402
from soar_fast.data.shards import ShardWriter  # noqa: E402


def write_cache(root: Path, *, rows: int, shard_size: int, latent: tuple[int, int, int], text: tuple[int, int],
                pooled: int) -> int:
    """A complete cache of `rows` random bf16 rows; returns the stored bytes per sample."""
    w = ShardWriter(root, fingerprint=f"bench_data-{rows}-{shard_size}-{latent}-{text}-{pooled}")
    g = torch.Generator().manual_seed(0)
    w.write_empty_prompt(torch.zeros(*text, dtype=torch.bfloat16), torch.zeros(pooled, dtype=torch.bfloat16))
    shards = 0
    for start in range(0, rows, shard_size):
        n = min(shard_size, rows - start)
        t = {"latents": torch.randn(n, *latent, generator=g).bfloat16(),
             "prompt_embeds": torch.randn(n, *text, generator=g).bfloat16(),
             "pooled": torch.randn(n, pooled, generator=g).bfloat16()}
        w.write_shard(shards, t, [f"caption {start + r}" for r in range(n)], [f"img{start + r}.png" for r in range(n)])
        shards += 1
    w.finish(shards)
    return 2 * (latent[0] * latent[1] * latent[2] + text[0] * text[1] + pooled)


def drop_page_cache(root: Path) -> None:
    for f in root.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(ds: LatentsDataset, *, workers: int, batch: int, warmup: int, batches: int, prefetch: int,
            pin: bool) -> dict[str, float]:
    """Start-up (first batch) and steady samples/s of the trainer's stream at `workers`."""
    stream = BatchStream(ds, ResumableSampler(len(ds), batch, seed=0, groups=ds.groups), num_workers=workers,
                         prefetch_factor=prefetch, pin_memory=pin)
    try:
        t0 = time.perf_counter()
        next(stream)
        first = time.perf_counter() - t0
        for _ in itertools.islice(stream, warmup):
            pass
        t1 = time.perf_counter()
        seen = 0
        for _, (z0, (pe, pooled), _) in itertools.islice(stream, batches):
            for t in (z0, pe, pooled):  # touch every page, as the copy to the device would
                t.view(-1)[::1024].sum()
            seen += z0.shape[0]
        wall = time.perf_counter() - t1
    finally:
        stream.close()
    return {"first_batch_s": first, "samples_per_s": seen / wall, "wall_s": wall, "samples": seen}


def run(args) -> list[dict]:
    results = lib.Results(args.out)
    info = lib.env_info(torch.device("cpu"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    target = args.target_factor * args.step_rate
    latent, text = tuple(args.latent), tuple(args.text)
    with tempfile.TemporaryDirectory(dir=args.cache_root) as tmp:
        root = Path(tmp) / "cache"
        t0 = time.perf_counter()
        per_sample = write_cache(root, rows=args.rows, shard_size=args.shard_size, latent=latent, text=text,
                                 pooled=args.pooled)
        print(f"wrote {args.rows} rows ({per_sample * args.rows / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        os.sync()  # the writeback of the fresh shards would otherwise land in the first measurement
        ds = LatentsDataset(str(root))
        shape = f"B{args.batch}x{latent}+txt{text[0]}x{text[1]}+pooled{args.pooled}"
        for page_cache, workers in itertools.product(args.page_cache, args.workers):
            runs = []
            for _ in range(args.repeats):  # a fresh stream each time, from position 0
                if page_cache == "cold":
                    drop_page_cache(root)
                runs.append(measure(ds, workers=workers, batch=args.batch, warmup=args.warmup, batches=args.batches,
                                    prefetch=args.prefetch_factor, pin=args.pin_memory and torch.cuda.is_available()))
            rates = sorted(r["samples_per_s"] for r in runs)
            m = {**min(runs, key=lambda r: abs(r["samples_per_s"] - statistics.median(rates))),
                 "samples_per_s": statistics.median(rates)}
            config = {"num_workers": workers, "prefetch_factor": args.prefetch_factor, "batch": args.batch,
                      "rows": args.rows, "shard_size": args.shard_size, "page_cache": page_cache,
                      "cpus": cpus, "pin_memory": args.pin_memory and torch.cuda.is_available()}
            base = {"bench": "data_read", "provider": "batch_stream", "variant": f"workers{workers}_{page_cache}",
                    "config": config, "shape": shape, "dtype": "bf16", **info}
            rate = m["samples_per_s"]
            results.add([
                {**base, "metric": "samples_per_s", "value": rate, "unit": "samples/s", "samples": m["samples"],
                 "wall_s": m["wall_s"], "repeats": rates, "stat": f"median of {args.repeats}", "target": target,
                 "target_desc": f"{args.target_factor:g}x the step benchmark's {args.step_rate:g} samples/s per GPU",
                 "passed": rate > target},
                {**base, "metric": "read_bandwidth", "value": rate * per_sample / 1e6, "unit": "MB/s",
                 "bytes_per_sample": per_sample},
                {**base, "metric": "first_batch_s", "value": m["first_batch_s"], "unit": "s"},
            ])
            print(f"{page_cache} workers={workers}: {rate:8.1f} samples/s ({rate * per_sample / 1e6:7.0f} MB/s), first batch "
                  f"{m['first_batch_s']:.2f} s, target > {target:g}: {'pass' if rate > target else 'FAIL'}", flush=True)
    return results.rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON rows file")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2, 4])
    p.add_argument("--batch", type=int, default=2, help="per-GPU batch of the step benchmark at 512 px")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--shard_size", type=int, default=64)
    p.add_argument("--latent", type=int, nargs=3, default=[16, 64, 64])
    p.add_argument("--text", type=int, nargs=2, default=[333, 4096], help="prompt_embeds tokens and width")
    p.add_argument("--pooled", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="measurements per setting; rows give the median")
    p.add_argument("--prefetch_factor", type=int, default=2)
    p.add_argument("--pin_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="pin batches as the trainer does on CUDA (only with CUDA)")
    p.add_argument("--page_cache", type=lambda s: s.split(","), default=["warm", "cold"],
                   help="warm (as written) and/or cold (the shards' cached pages dropped before each measurement)")
    p.add_argument("--step_rate", type=float, default=7.8, help="per-GPU samples/s of the step benchmark")
    p.add_argument("--target_factor", type=float, default=10.0)
    p.add_argument("--cache_root", default=None, help="where to write the temporary cache (default: the OS temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny rows and few batches (tests)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.rows, args.shard_size, args.latent, args.text, args.pooled = 12, 4, [4, 8, 8], [7, 16], 8
        args.warmup, args.batches, args.repeats = 1, 6, 1
    if any(pc not in ("warm", "cold") for pc in args.page_cache):
        raise SystemExit(f"--page_cache {','.join(args.page_cache)}: choose warm, cold or warm,cold")
    rows = run(args)
    return 0 if all(r["passed"] for r in rows if r["metric"] == "samples_per_s") or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
