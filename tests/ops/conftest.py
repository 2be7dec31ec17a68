"""Fixtures of the fused-op tests: outputs poisoned with NaN, and the native extension built once."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # Kernel launchers (Triton and native) fill their outputs with NaN first: unwritten elements fail.
    monkeypatch.setenv("SOAR_FAST_POISON_OUTPUTS", "1")


@pytest.fixture(scope="session")
def native_lib(tmp_path_factory) -> Path:
    """Build kernels/ with CMake (+ ninja when present) into a session tmp dir and load it; or load
    $SOAR_FAST_NATIVE_LIB when set (the GPU script builds once and points here)."""
    from soar_fast.ops.native import LIB_NAME, load_native

    env = os.environ.get("SOAR_FAST_NATIVE_LIB")
    if env:
        return load_native(env)
    build = tmp_path_factory.mktemp("native_build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t = time.time()
    subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *gen],
        check=True,
        capture_output=True,
        text=True,
    )
    r = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"native build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    print(f"[native build took {time.time() - t:.1f} s]")
    return load_native(build / "kernels" / LIB_NAME)
