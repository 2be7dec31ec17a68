"""The one dispatch point of the fused ops: auto falls back to the reference, logging once."""

import logging

import pytest
import torch

from soar_fast.ops import dispatch, soar_aux_states


def _inputs(b=2, m=3):
    z = [torch.randn(b, 3, 4) for _ in range(4)]
    s0 = torch.rand(b) * 0.5 + 0.5
    s1 = s0 - 0.1
    return (*z, s0, s1, s1 + torch.rand(m, b) * (1 - s1))


def test_auto_on_cpu_runs_reference_and_logs_once(caplog, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="soar_fast.ops.dispatch"):
        a = soar_aux_states(*_inputs(), 4.5)
        soar_aux_states(*_inputs(), 4.5)
    lines = [r for r in caplog.records if "soar_aux_states" in r.getMessage()]
    assert len(lines) == 1 and "reference" in lines[0].getMessage()
    assert a[0].shape == (6, 3, 4) and a[1].shape == (6, 3, 4)


def test_env_override_and_bad_names(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve_backend("soar_aux_states", "auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.resolve_backend("soar_aux_states", "auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        soar_aux_states(*_inputs(), 4.5, backend="fast")


def test_shape_errors_name_the_argument():
    z0, z1, vu, vc, s0, s1, sa = _inputs()
    with pytest.raises(ValueError, match="v_cond"):
        soar_aux_states(z0, z1, vu, vc[:, :2], s0, s1, sa, 4.5)
    with pytest.raises(ValueError, match="sigma_aux"):
        soar_aux_states(z0, z1, vu, vc, s0, s1, sa[:, :1], 4.5)


def test_outputs_are_point_major_in_z0_dtype():
    z0, z1, vu, vc, s0, s1, sa = _inputs(b=2, m=3)
    za, vcorr = soar_aux_states(z0.half(), z1.half(), vu.half(), vc.half(), s0, s1, sa, 4.5, backend="reference")
    assert za.dtype == torch.float16 and vcorr.dtype == torch.float16
    za32, _ = soar_aux_states(z0, z1, vu, vc, s0, s1, sa[1:2], 4.5, backend="reference")
    full, _ = soar_aux_states(z0, z1, vu, vc, s0, s1, sa, 4.5, backend="reference")
    torch.testing.assert_close(full[2:4], za32)  # rows m*B .. m*B+B-1 are point m
