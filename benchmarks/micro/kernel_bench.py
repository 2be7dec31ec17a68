"""Shared helpers of the kernel microbenchmarks: timing quantiles, copy bandwidth, minimal byte
counts of each fused op, and long-format JSON rows (DESIGN.md "Results rows").

Timing: on CUDA `triton.testing.do_bench` (p20/p50/p80, L2 flushed between reps); on CPU
perf_counter over a few reps (smoke only: numbers from the Triton interpreter mean nothing).
Environment: SOAR_FAST_BENCH_JSON (JSONL file rows are appended to), SOAR_FAST_BENCH_SMOKE=1
(tiny shapes), SOAR_FAST_BENCH_COMPILE (1/0: include the torch.compile provider; default on CUDA
only), SOAR_FAST_BENCH_FULL=1 (GPU: all dtypes for compile, more shapes).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

QUANTILES = (0.2, 0.5, 0.8)

# Each (shape, dtype, grad mode) is its own compiled graph of the reference: keep them all compiled.
for _name in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)


def smoke() -> bool:
    return (
        os.environ.get("SOAR_FAST_BENCH_SMOKE", "0") not in ("", "0")
        or not torch.cuda.is_available()
    )


def full() -> bool:
    return os.environ.get("SOAR_FAST_BENCH_FULL", "0") not in ("", "0")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def want_compile(dtype: torch.dtype) -> bool:
    env = os.environ.get("SOAR_FAST_BENCH_COMPILE")
    if env is not None:
        return env not in ("", "0")
    return torch.cuda.is_available() and (full() or dtype == torch.bfloat16)


def native_ready() -> bool:
    from soar_fast.ops.native import native_available

    if not native_available():
        return False
    if device().type == "cuda":
        return torch.ops.soar_fast_native.aux_states.default.has_kernel_for_dispatch_key("CUDA")
    return True


def triton_ready() -> bool:
    from soar_fast.ops._common import interpreting, triton_available

    return triton_available() and (torch.cuda.is_available() or interpreting())


def timings_ms(fn) -> tuple[float, float, float]:
    """(p20, p50, p80) in ms of fn() after warmup."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        q = do_bench(fn, warmup=10, rep=40, quantiles=list(QUANTILES))
        return tuple(float(x) for x in q)  # type: ignore[return-value]
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    pick = lambda q: ts[min(len(ts) - 1, round(q * (len(ts) - 1)))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


@functools.cache
def copy_bandwidth_gbps() -> float:
    """Bandwidth of a large device-to-device copy (read + write) on this device, measured now."""
    n = (1 << 28) if torch.cuda.is_available() else (1 << 22)  # 1 GiB / 16 MiB of fp32
    x = torch.randn(n, device=device())
    y = torch.empty_like(x)
    _, p50, _ = timings_ms(lambda: y.copy_(x))
    gbps = 2 * x.numel() * x.element_size() / (p50 * 1e-3) / 1e9
    emit(
        op="copy",
        provider="torch",
        mode="fwd",
        shape=f"{n}",
        dtype="float32",
        metric="copy_gbps",
        value=gbps,
        unit="GB/s",
        bytes=2 * n * 4,
    )
    return gbps


# Minimal bytes a fused op must move (E = B*N elements per [B, ...] tensor, s = element size).
def bytes_aux_states(e: int, m: int, s: int) -> int:
    """reads z0, z1, v_uncond, v_cond; writes z' and v_corr for M points."""
    return (4 + 2 * m) * e * s


def bytes_aux_z(e: int, m: int, s: int) -> int:
    """reads the four inputs; writes z' only (v_corr recomputed by the fused loss)."""
    return (4 + m) * e * s


def bytes_loss(e: int, m: int, s: int, mode: str) -> int:
    """fwd reads v [(1+M)E], z0, z1, z' (or v_corr) [ME]; bwd reads the same and writes grad_v;
    "loss+grad" (forward and backward in one pass) reads the inputs once and writes grad_v."""
    fwd = (3 + 2 * m) * e * s
    bwd = fwd + (1 + m) * e * s
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd, "loss+grad": bwd}[mode]


@functools.cache
def _env() -> dict:
    commit = os.environ.get("SOAR_FAST_COMMIT")  # wins over git (a copied tree's metadata can be stale)
    try:
        commit = commit or subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"],
            text=True,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).parent,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    dev = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    )
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": tv,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }


def emit(**row) -> dict:
    """Append one long-format row to $SOAR_FAST_BENCH_JSON (if set) and return it."""
    row = {**row, **_env()}
    out = os.environ.get("SOAR_FAST_BENCH_JSON")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


def report(
    op: str,
    provider: str,
    mode: str,
    shape: str,
    dtype: torch.dtype,
    fn,
    nbytes: int,
    benchmark=None,
) -> list[dict]:
    """Time fn, emit p20/p50/p80, bytes, GB/s and % of copy bandwidth rows."""
    copy_bw = copy_bandwidth_gbps()
    p20, p50, p80 = timings_ms(fn)
    if benchmark is not None:  # pytest-benchmark's own table when run with --benchmark-enable
        benchmark.extra_info.update(op=op, provider=provider, mode=mode, shape=shape, bytes=nbytes)
        benchmark.pedantic(fn, rounds=3 if smoke() else 20, iterations=1, warmup_rounds=1)
    dts = str(dtype).split(".")[-1]
    gbps = nbytes / (p50 * 1e-3) / 1e9
    common = dict(op=op, provider=provider, mode=mode, shape=shape, dtype=dts)
    rows = [
        emit(**common, metric=f"time_ms_p{int(q * 100)}", value=v, unit="ms")
        for q, v in zip(QUANTILES, (p20, p50, p80), strict=True)
    ]
    rows.append(emit(**common, metric="bytes", value=nbytes, unit="B"))
    rows.append(
        emit(**common, metric="gbps", value=gbps, unit="GB/s", bytes=nbytes, copy_gbps=copy_bw)
    )
    rows.append(
        emit(
            **common,
            metric="pct_copy_bw",
            value=100 * gbps / copy_bw,
            unit="%",
            bytes=nbytes,
            copy_gbps=copy_bw,
        )
    )
    assert all(math.isfinite(r["value"]) for r in rows)
    return rows
