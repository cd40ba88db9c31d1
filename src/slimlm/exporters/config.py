"""What `slimlm export` writes: the settings of `slimlm.export`."""

from __future__ import annotations

import dataclasses

from slimlm.core.config import Config, check, field

FORMATS = ("gguf", "hf")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


@dataclasses.dataclass(frozen=True)
class ExportConfig(Config):
    """Settings of an export to another tool's format."""

    name = "export"
    format: str = field("gguf", "gguf (one file for llama.cpp, Ollama, LM Studio) or hf (a dense float Hugging Face "
                                "folder any tool loads)")
    type: str | None = field(None, "GGUF type for layers no GGUF type holds exactly (int3/int2, log, fp8, W8A8, odd "
                                   f"group widths): {', '.join(GGUF_TYPES)}; unset: such a model is refused")
    float_type: str = field("auto", "GGUF type of float matrices: auto (their own precision), f32, f16 or bf16")
    kl_samples: int = field(8, "windows of 128 tokens of the built-in text on which the KL of any re-quantization "
                               "is measured (0: not measured)")

    def __post_init__(self) -> None:
        check(self.format in FORMATS, f"format '{self.format}' is not known; use one of {', '.join(FORMATS)}")
        check(self.type is None or self.type in GGUF_TYPES,
              f"GGUF type '{self.type}' is not one slimlm writes; use one of {', '.join(GGUF_TYPES)}")
        check(self.float_type in ("auto", "f32", "f16", "bf16"),
              f"float type '{self.float_type}' is not known; use auto, f32, f16 or bf16")
        check(isinstance(self.kl_samples, int) and self.kl_samples >= 0, f"kl_samples {self.kl_samples!r} must be >= 0")
        check(self.format == "gguf" or (self.type is None and self.float_type == "auto"),
              "--type and --float-type apply to GGUF; drop them for --format hf")
