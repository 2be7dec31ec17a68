"""The one dispatch point: auto picks Triton on CUDA only, env overrides, explicit backends fail
clearly when they cannot run, one log line per choice, and soar_fast imports without triton."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from soar_fast.ops import dispatch, soar_aux_states, soar_fused_mse

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch._logged.clear()


def test_auto_choices():
    assert (
        dispatch.resolve_backend("x", "auto", CPU, torch.float32) == "reference"
    )  # interpreter on or not
    assert dispatch.resolve_backend("x", "auto", CUDA, torch.bfloat16) == "triton"
    assert dispatch.resolve_backend("x", "auto", CUDA, torch.float64) == "reference"


def test_auto_without_triton_is_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.resolve_backend("x", "auto", CUDA, torch.bfloat16) == "reference"
    with pytest.raises(RuntimeError, match="triton package"):
        dispatch.resolve_backend("x", "triton", CUDA, torch.bfloat16)


def test_env_forces_each_backend(monkeypatch, native_lib):
    for name in ("reference", "triton", "native"):
        monkeypatch.setenv(dispatch.ENV_VAR, name)
        assert dispatch.resolve_backend("x", "auto", CPU, torch.float32) == name


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.resolve_backend("x", "triton", CPU, torch.float32)


def test_native_not_built_is_a_clear_error(monkeypatch, tmp_path):
    from soar_fast.ops import native

    monkeypatch.setitem(native._state, "loaded", None)
    monkeypatch.setattr(native, "candidate_paths", lambda: [tmp_path / native.LIB_NAME])
    with pytest.raises(RuntimeError, match="not built"):
        dispatch.resolve_backend("x", "native", CPU, torch.float32)


def test_one_log_line_names_the_backend_that_ran(caplog, monkeypatch):
    z = [torch.randn(2, 3, 4) for _ in range(4)]
    s0 = torch.tensor([0.6, 0.8])
    sa = torch.rand(2, 2) * 0.3 + 0.7
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with caplog.at_level(logging.INFO, logger="soar_fast.ops.dispatch"):
        za, _ = soar_aux_states(*z, s0, s0 - 0.02, sa, 4.5)
        soar_aux_states(*z, s0, s0 - 0.02, sa, 4.5)
        v = torch.randn(6, 3, 4)
        soar_fused_mse(v, z[0], z[1], za, sa, torch.ones(6))
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("soar_aux_states" in m for m in msgs) == 1
    assert any(
        "soar_aux_states: using the triton backend" in m and dispatch.ENV_VAR in m for m in msgs
    )
    assert any("soar_fused_mse: using the triton backend" in m for m in msgs)


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, soar_fast, soar_fast.ops as ops\n"
        "from soar_fast.ops import dispatch\n"
        "assert not dispatch.triton_available()\n"
        "z = [torch.randn(2, 3) for _ in range(4)]; s = torch.tensor([0.5, 0.6])\n"
        "za, vc = ops.soar_aux_states(*z, s, s - 0.02, s[None] + 0.1, 4.5)\n"
        "print(za.shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([2, 3])" in r.stdout


def test_auto_prefers_a_native_cuda_build(monkeypatch):
    """With the extension built with CUDA kernels, auto on CUDA runs native (measured faster than
    Triton on an H200); a CPU-only build (CI's) leaves auto on Triton."""
    monkeypatch.setattr(dispatch, "native_cuda_ready", lambda: True)
    monkeypatch.setattr(dispatch, "load_native", lambda: None)
    assert dispatch.resolve_backend("x", "auto", CUDA, torch.bfloat16) == "native"
    assert dispatch.resolve_backend("x", "auto", CUDA, torch.float64) == "reference"
    assert dispatch.resolve_backend("x", "auto", CPU, torch.float32) == "reference"
    monkeypatch.setattr(dispatch, "native_cuda_ready", lambda: False)
    assert dispatch.resolve_backend("x", "auto", CUDA, torch.bfloat16) == "triton"
