"""What a quantized weight looks like: bit width, grouping, symmetry, scale precision."""

from __future__ import annotations

import dataclasses

import torch

from slimlm.core.config import Config, check

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GROUP_SIZES = (32, 64, 128, 256)
BITS = (8, 4, 3, 2)


@dataclasses.dataclass(frozen=True)
class QuantScheme(Config):
    """Linear (uniform) integer weight quantization of one layer.

    bits: 8, 4, 3 or 2. group_size: number of consecutive input columns sharing a scale (32/64/128/256),
    or None for one scale per output channel. symmetric: zero point fixed at the middle of the
    range (w = (q - 2^(b-1)) * s) instead of a per-group integer zero point (w = (q - z) * s).
    scale_dtype: precision the scales are stored in.
    """

    name = "quantization scheme"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        check(
            isinstance(self.bits, int) and not isinstance(self.bits, bool) and self.bits in BITS,
            f"bits={self.bits!r} is not supported; use one of {', '.join(map(str, BITS))} (8 and 4 have fast kernels)",
        )
        check(
            self.group_size is None or (isinstance(self.group_size, int) and self.group_size in GROUP_SIZES),
            f"group size {self.group_size!r} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"
            " or none for per-channel scales",
        )
        check(isinstance(self.symmetric, bool), f"symmetric must be true or false, got {self.symmetric!r}")
        check(
            self.scale_dtype in SCALE_DTYPES,
            f"scale dtype '{self.scale_dtype}' is not supported; use one of {', '.join(SCALE_DTYPES)}",
        )

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"
