"""The CUDA launch branch of the Triton launchers (autotuned kernels, grid from the chosen BLOCK,
zero-filled partials laid out for the smallest block) run here under the interpreter with a
one-config autotuner: the interpreter cannot autotune several configs, but the code path is the
one a GPU takes."""

from __future__ import annotations

import pytest
import torch
import triton
from soar_ops_cases import assert_close_to_oracle
from test_soar_aux_states import G
from test_soar_aux_states import make_case as aux_case
from test_soar_mse import make_case as mse_case
from test_soar_mse import oracle

from soar_fast.ops.soar_aux_states import triton_kernels as aux_tk
from soar_fast.ops.soar_mse import triton_kernels as mse_tk


@pytest.fixture
def cuda_branch(monkeypatch):
    one = [triton.Config({"BLOCK": 256}, num_warps=4)]
    monkeypatch.setattr(aux_tk, "interpreting", lambda: False)
    monkeypatch.setattr(mse_tk, "interpreting", lambda: False)
    monkeypatch.setattr(
        aux_tk,
        "_aux_states_kernel_tuned",
        triton.autotune(configs=one, key=["N", "M"])(aux_tk._aux_states_kernel),
    )
    monkeypatch.setattr(
        mse_tk,
        "_fused_mse_kernel_tuned",
        triton.autotune(configs=one, key=["N", "M"])(mse_tk._fused_mse_kernel),
    )
    monkeypatch.setattr(
        mse_tk, "_MIN_CUDA_BLOCK", 128
    )  # partials wider than the grid: zero columns must add nothing


def test_aux_states_cuda_branch(cuda_branch):
    args, oracle_out = aux_case((2, 3, 5, 41), 3, torch.float32)
    z_aux, v_corr = aux_tk.aux_states_triton(*args, G)
    for out, ora in zip((z_aux, v_corr), oracle_out, strict=True):
        assert_close_to_oracle(out, ora, torch.float32, None, "cuda-branch aux")


def test_fused_mse_cuda_branch(cuda_branch):
    args, grad = mse_case((2, 3, 5, 41), 3, torch.float32)
    loss_o, gv_o = oracle(args, torch.ones_like(grad))
    loss, gv = mse_tk.fused_mse_and_grad_triton(*args)
    assert_close_to_oracle(loss, loss_o, torch.float32, None, "cuda-branch loss")
    assert_close_to_oracle(gv, gv_o, torch.float32, None, "cuda-branch grad")
    assert_close_to_oracle(
        mse_tk.fused_mse_forward_triton(*args), loss_o, torch.float32, None, "cuda-branch fwd"
    )
