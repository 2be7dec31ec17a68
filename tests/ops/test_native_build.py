"""The native extension builds (CMake, CPU C++), registers its ops, and its CUDA sources compile
with nvcc alone (they include no ATen), so CI without a GPU proves the .cu files build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
OPS = ("aux_states", "aux_states_z", "fused_mse", "fused_mse_backward", "fused_mse_and_grad")


def test_native_library_registers_cpu_ops(native_lib):
    assert Path(native_lib).is_file()
    for name in OPS:
        op = getattr(torch.ops.soar_fast_native, name).default
        assert op.has_kernel_for_dispatch_key("CPU"), name


def test_native_fp64_cpu_matches_reference(native_lib):
    """The CPU path also serves fp64 (computed in fp64), useful as a second oracle."""
    from soar_fast.ops import soar_aux_states

    z = [torch.randn(2, 3, 5, dtype=torch.float64) for _ in range(4)]
    s0 = torch.tensor([0.7, 0.4], dtype=torch.float64)
    s1, sa = s0 - 0.02, torch.tensor([[0.8, 0.5], [0.9, 0.95]], dtype=torch.float64)
    ref = soar_aux_states(*z, s0, s1, sa, 4.5, backend="reference")
    nat = soar_aux_states(*z, s0, s1, sa, 4.5, backend="native")
    for a, b in zip(nat, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("src", ["soar_aux_states/aux_states.cu", "soar_mse/fused_mse.cu"])
def test_cuda_sources_compile_with_nvcc(tmp_path, src):
    out = tmp_path / (Path(src).stem + ".o")
    r = subprocess.run(
        [
            "nvcc",
            "-c",
            "-std=c++17",
            "-O3",
            "-arch=sm_90",
            str(KERNELS / "csrc" / src),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.stat().st_size > 0
    syms = subprocess.run(["nm", "-C", str(out)], capture_output=True, text=True).stdout
    launcher = "aux_states_cuda" if "aux" in src else "fused_mse_cuda"
    assert f"soar_native::{launcher}" in syms, (
        "the plain launcher the bindings call must be defined"
    )


def _torch_include() -> Path:
    return Path(torch.__file__).parent / "include"


@pytest.mark.skipif(
    not (
        Path("/usr/local/cuda/include/cuda_runtime.h").is_file()
        and (_torch_include() / "c10/cuda/CUDAStream.h").is_file()
    ),
    reason="needs the CUDA toolkit headers and torch's c10/cuda headers",
)
def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    """bindings_cuda.cpp (the ATen side of the CUDA path) type-checks against this torch's headers.
    A CPU wheel lacks only the generated c10/cuda/impl/cuda_cmake_macros.h, stubbed empty here."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    inc = _torch_include()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    r = subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-fsyntax-only",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{tmp_path}",
            f"-I{inc}",
            f"-I{inc / 'torch/csrc/api/include'}",
            "-I/usr/local/cuda/include",
            str(KERNELS / "csrc" / "bindings_cuda.cpp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
