"""Scalars to TensorBoard and to metrics.jsonl (one JSON object per logged step; the report reads it).

Bookkeeping of `metrics.jsonl`, so that the file always reads as one run, one row per step:
- a resumed run (from the checkpoint of step s) rewrites the file before its first row: the rows
  of steps <= s are kept (the last one of a step, should an older file hold two), rows past s
  (logged by the interrupted run after its checkpoint) are dropped, as is a torn line (a partial
  JSON row of a killed write);
- a run that starts from step 0 (a fresh run, or `--resume` with no checkpoint yet, e.g. a run
  killed before its first checkpoint) never appends to a metrics.jsonl already there: that file is
  moved aside to `metrics.prev.jsonl` (replacing an older one), and the run starts a new file.
The rewrite goes to a temporary file and is renamed into place, so a kill during it loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MetricsLogger", "read_metrics"]

log = logging.getLogger(__name__)
PREV = "metrics.prev.jsonl"


def _parse_rows(text: str) -> tuple[list[dict[str, Any]], int]:
    """The rows of a metrics.jsonl text that parse (with an int step), and how many lines did not."""
    rows, bad = [], 0
    for ln in text.splitlines():
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            int(row["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        rows.append(row)
    return rows, bad


def _rewrite(path: Path, resume_step: int) -> None:
    """Keep one row per step <= resume_step (the last of each), in step order; drop the rest."""
    rows, bad = _parse_rows(path.read_text(encoding="utf-8", errors="replace"))
    by_step = {int(r["step"]): r for r in rows if int(r["step"]) <= resume_step}
    dropped = len(rows) - len(by_step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(by_step[s]) + "\n" for s in sorted(by_step)), encoding="utf-8")
    os.replace(tmp, path)
    if dropped or bad:
        log.info("%s: kept %d row(s) up to step %d, dropped %d later or repeated row(s) and %d torn line(s)",
                 path, len(by_step), resume_step, dropped, bad)


class MetricsLogger:
    """`metrics.jsonl` (rewritten consistently at start, see the module doc, then appended) plus an
    optional TensorBoard `SummaryWriter` under logs/. `resume_step`: the step the run resumed at
    (None: the run starts from step 0)."""

    def __init__(self, output_dir: str | Path, report_to: str, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.path.exists():
            if resume_step is not None:
                _rewrite(self.path, resume_step)
            else:
                os.replace(self.path, self.path.with_name(PREV))
                log.warning("%s belonged to an earlier run that started from step 0; moved it to %s",
                            self.path, PREV)
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides an earlier run's events from that step on (0: all of them, a fresh start)
            self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "logs"),
                                    purge_step=resume_step if resume_step is not None else 0)

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
    """The rows of `<output_dir>/metrics.jsonl` (empty if missing); a torn line is skipped."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _parse_rows(path.read_text(encoding="utf-8", errors="replace"))[0]
