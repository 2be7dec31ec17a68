"""Collects benchmarks/micro/bench_*.py as pytest modules (pytest-benchmark style microbenchmarks).

python -m pytest benchmarks/micro                      # CPU: smoke shapes, Triton interpreter
SOAR_FAST_BENCH_JSON=rows.jsonl python -m pytest benchmarks/micro   # GPU: real shapes, rows out
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit import


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def bench(request):
    """pytest-benchmark's `benchmark` fixture when that plugin is active (its table then sits beside
    our rows; pass --benchmark-enable for real rounds), else None (rows only)."""
    if request.config.pluginmanager.hasplugin("benchmark"):
        return request.getfixturevalue("benchmark")
    return None
