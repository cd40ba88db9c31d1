"""Calibration settings shared by calibrated methods (GPTQ, AWQ, SmoothQuant, ...)."""

from __future__ import annotations

import dataclasses

from slimlm.core.config import check


@dataclasses.dataclass(frozen=True)
class CalibrationFields:
    """Where calibration text comes from and how much of it: `calib` is a .txt/.jsonl path or 'demo'
    (a document range may follow, `file.txt@0:500`); n_samples windows of seq_len tokens, seeded."""

    calib: str = "demo"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 1

    def __post_init__(self) -> None:
        for field in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, field)
            check(isinstance(value, int) and value >= 1, f"{field} {value!r} must be a positive integer")
        check(isinstance(self.calib, str) and self.calib, "calib must name a .txt/.jsonl file or 'demo'")
