"""`ParallelConfig` (defined in `soar_fast.config.parallel`, the `parallel` section of
`TrainConfig`), re-exported here, plus the torch dtypes its dtype names stand for."""

from __future__ import annotations

import torch

from soar_fast.config.parallel import ParallelConfig

__all__ = ["DTYPES", "ParallelConfig"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
