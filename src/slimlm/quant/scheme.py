"""What a quantized weight looks like: number format, bit width, grouping, symmetry, scale precision."""

from __future__ import annotations

import dataclasses

import torch

from slimlm.core.config import Config, check, field

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP = {8: None}  # group_size 0: per-channel at 8 bits, else 128
BITS = (8, 4, 3, 2)
FORMATS = ("int", "log", "fp8")
LOG_BITS = (4, 3, 2)


@dataclasses.dataclass(frozen=True)
class QuantScheme(Config):
    """Weight quantization of one layer: every group of weights shares a scale s and each weight is
    stored as a b-bit code q.

    format: how a code maps to a value (see `primitives`):
      "int": uniform integers, w = (q - z) * s (the default; fast kernels for 8 and 4 bits);
      "log": powers of two, w = s * ±2^-e or 0 (arXiv 1603.01025); bits 4, 3 or 2, symmetric;
      "fp8": the code is a float8 e4m3 byte, w = e4m3(q) * s (arXiv 2209.05433); bits 8, symmetric.
    bits: 8, 4, 3 or 2. group_size: number of consecutive input columns sharing a scale (32/64/128/256),
    or None for one scale per output channel; 0 (the default) picks by bits: one scale per channel at
    8 bits (the int8 kernels on CPU and CUDA read only that layout: an int8 g128 model decoded a
    1.1B Llama shape at 1 token/s on the reference path, against 30 per-channel), else 128. symmetric: zero point fixed at the middle of the
    range (w = (q - 2^(b-1)) * s) instead of a per-group integer zero point (w = (q - z) * s); the
    log and fp8 formats are signed codes and need it. scale_dtype: precision the scales are stored in.
    """

    name = "quantization scheme"
    bits: int = field(4, "weight bits: 8, 4, 3 or 2 (8 and 4 have fast kernels)")
    group_size: int | None = field(0, "input columns sharing a scale: 32, 64, 128, 256, none for per-channel, or 0 "
                                      "for the default by bits: 128, and per-channel at 8 bits (the fast int8 "
                                      "kernels' layout)")
    symmetric: bool | None = field(None, "zero point fixed at the middle of the range (default: asymmetric for int, "
                                         "symmetric for log and fp8, which store a sign)")
    scale_dtype: str = field("float16", "precision the scales are stored in: float16, bfloat16 or float32")
    format: str = field("int", "code format: int (uniform), log (powers of two; bits 4/3/2) or fp8 (e4m3; bits 8)")

    def __post_init__(self) -> None:
        check(
            isinstance(self.bits, int) and not isinstance(self.bits, bool) and self.bits in BITS,
            f"bits={self.bits!r} is not supported; use one of {', '.join(map(str, BITS))} (8 and 4 have fast kernels)",
        )
        if self.group_size == 0 and not isinstance(self.group_size, bool):  # the default by bits
            object.__setattr__(self, "group_size", DEFAULT_GROUP.get(self.bits, 128))
            object.__setattr__(self, "_group_by_bits", True)  # a change of bits re-picks it (`with_changes`)
        check(
            self.group_size is None or (isinstance(self.group_size, int) and self.group_size in GROUP_SIZES),
            f"group size {self.group_size!r} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"
            " or none for per-channel scales",
        )
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.format in ("log", "fp8"))
        check(isinstance(self.symmetric, bool), f"symmetric must be true or false, got {self.symmetric!r}")
        check(
            self.scale_dtype in SCALE_DTYPES,
            f"scale dtype '{self.scale_dtype}' is not supported; use one of {', '.join(SCALE_DTYPES)}",
        )
        check(self.format in FORMATS, f"format {self.format!r} is not supported; use one of {', '.join(FORMATS)}")
        if self.format == "log":
            check(self.bits in LOG_BITS,
                  f"format 'log' supports bits {', '.join(map(str, LOG_BITS))}, not bits={self.bits}")
            check(self.symmetric, "format 'log' stores a sign and an exponent, no zero point: set symmetric=true")
        if self.format == "fp8":
            check(self.bits == 8 and self.symmetric,
                  f"format 'fp8' stores float8 e4m3 bytes: set bits=8 and symmetric=true (got bits={self.bits}, "
                  f"symmetric={str(self.symmetric).lower()})")

    def field_values(self, changes: dict | None = None) -> dict:
        """This scheme's settings with `changes` applied; a group size picked by bits is picked again
        (an override of bits:4 on an int8 default gets groups of 128, not one scale per channel)."""
        values = {name: getattr(self, name) for name in QuantScheme.field_names()}
        if getattr(self, "_group_by_bits", False):
            values["group_size"] = 0
        return {**values, **(changes or {})}

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        if self.format == "log":
            return f"log{self.bits} {group}"
        if self.format == "fp8":
            return f"fp8 {group}"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"
