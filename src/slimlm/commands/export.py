"""`slimlm export MODEL -o OUT --format gguf|hf`: a model (slimlm, compressed-tensors or plain
folder) as one GGUF file for llama.cpp / Ollama / LM Studio, or as a dense float Hugging Face folder."""

from __future__ import annotations

import argparse

from slimlm.commands._common import quiet_libraries
from slimlm.commands._flags import add_config_flags, settings_from_args


def export_config():
    from slimlm.exporters.config import ExportConfig

    return ExportConfig


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder, or 'demo'")
    p.add_argument("-o", "--output", required=True, help="output file (.gguf) or folder (--format hf)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    add_config_flags(p, [export_config()])


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from pathlib import Path

    from slimlm.api import export, load
    from slimlm.core.errors import SlimError
    from slimlm.core.files import check_output_path

    settings = settings_from_args(args, export_config())
    config = export_config().from_dict(settings)
    out = Path(args.output).expanduser()
    if config.format == "hf":
        check_output_path(out, args.overwrite)
    else:
        if out.exists() and not args.overwrite:
            raise SlimError(f"output file '{out}' already exists; pass --overwrite or choose another path")
        if not out.parent.is_dir():
            raise SlimError(f"parent folder of '{out}' does not exist; create it or choose another output path")
    if config.format == "gguf" and config.float_type == "auto":
        from slimlm.core.model_io import read_config_json, resolve_model_path

        stored = read_config_json(resolve_model_path(args.model)).get("dtype")  # slimlm loads float16 as float32 on CPU
        settings["float_type"] = {"float16": "f16", "bfloat16": "bf16"}.get(stored, "auto")
    model, tokenizer = load(args.model)
    result = export(model, out, tokenizer, overwrite=args.overwrite, **settings)
    print(result.summary() if config.format == "gguf" else f"wrote {result} (dense float; loads with plain transformers)")
    return 0
