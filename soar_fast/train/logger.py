"""Scalars to TensorBoard and to metrics.jsonl (one JSON object per logged step; the report reads it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MetricsLogger", "read_metrics"]


class MetricsLogger:
    """Append-only `metrics.jsonl` plus an optional TensorBoard `SummaryWriter` under logs/."""

    def __init__(self, output_dir: str | Path, report_to: str, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Rows past the checkpoint were logged by the interrupted run; the resumed run rewrites them.
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "logs"), purge_step=resume_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, array: np.ndarray, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `<output_dir>/metrics.jsonl` (empty if missing)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
