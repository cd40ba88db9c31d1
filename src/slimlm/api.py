"""The public verbs: load, save, quantize, evaluate, bench, generate, compress.

Each resolves names to configs and calls the packages below; none of them parses command lines.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimlm.core.errors import SlimError

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (task, done, total)


def load(path: str | os.PathLike = "demo", dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """Load `(model, tokenizer)` from 'demo' or a local Hugging Face folder (compressed or not)."""
    import slimlm.quant.linear  # noqa: F401  (registers the compressed layer kinds the loader builds)
    import slimlm.quant.compressed_tensors_io  # noqa: F401
    import slimlm.quant.w8a8  # noqa: F401
    import slimlm.pruning.storage  # noqa: F401  (registers the bitmask storage of pruned weights)
    from slimlm.core.model_io import load_model

    if isinstance(dtype, str):
        from slimlm.quant.cast import FLOAT_DTYPES

        if dtype not in FLOAT_DTYPES:
            raise SlimError(f"dtype '{dtype}' is not supported; use one of {', '.join(FLOAT_DTYPES)}")
        dtype = FLOAT_DTYPES[dtype]
    return load_model(path, dtype=dtype, device=device)


SAVE_FORMATS = ("auto", "slimlm", "compressed-tensors")


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         recipe: list[dict] | None = None, report: Any = None, format: str = "auto") -> Path:
    """Save `model` as a Hugging Face folder at `path` (atomically), with its recipe and report.

    format: 'compressed-tensors' (int4/int8 weight-only layers; plain transformers and vLLM load
    the folder), 'slimlm' (every scheme; `slimlm.load` reads it), or 'auto': compressed-tensors
    when the model's layers can be expressed in it, else slimlm's format."""
    from slimlm.core.model_io import save_model
    from slimlm.core.recipe import dump_recipe

    if format not in SAVE_FORMATS:
        raise SlimError(f"unknown save format '{format}'; use one of {', '.join(SAVE_FORMATS)}")
    exporter = None
    if format != "slimlm":
        from slimlm.quant import compressed_tensors_io as ct

        reason = ct.export_reason(model)
        if reason is None:
            exporter = ct.to_compressed_tensors
        elif format == "compressed-tensors":
            raise SlimError(f"cannot save as compressed-tensors: {reason}; use format 'slimlm'")
        elif "no quantized layers" not in reason:
            log.info("saving in slimlm format: %s", reason)
    extra = {}
    recipe = recipe if recipe is not None else getattr(model, "slimlm_recipe", None)
    if recipe:
        extra["recipe.yaml"] = dump_recipe(recipe)
    if report is not None:
        extra["report.md"] = report.to_markdown()
        extra["report.json"] = report.to_json() + "\n"
    encoder = None
    if getattr(model.config, "slimlm_sparsity", None):
        from slimlm.pruning.storage import encode_sparse_ as encoder
    return save_model(model, path, tokenizer, extra_files=extra, overwrite=overwrite, exporter=exporter, encoder=encoder)


def quantize(model: nn.Module, method: str = "rtn", tokenizer=None, calibration: torch.Tensor | None = None,
             on_block: Callable[[int, int], None] | None = None, **settings: Any) -> nn.Module:
    """Quantize `model` in place with a registered method ('rtn', 'gptq', 'cast', ...) and return it.

    Example: `slimlm.quantize(model, "rtn", bits=4, group_size=32, exclude=["*.mlp.down_proj"])`.
    Calibrated methods (gptq) read `calib` (a text file or 'demo') with `tokenizer`, or take
    `calibration`, token ids (n, T) or (T,) from which `n_samples` windows are drawn.
    """
    from slimlm.quant.methods import get_method

    m = get_method(method)
    config = m.config_cls.from_dict(settings)
    if m.calibrated:
        m.apply(model, config, _calibration_samples(model, method, config, tokenizer, calibration), on_block)
    else:
        m.apply(model, config)
    _record_step(model, method, config)
    return model


def _calibration_samples(model: nn.Module, method: str, config: Any, tokenizer, calibration: torch.Tensor | None):
    """Token windows (n, T) for a calibrated method: given ids (n, T) as they are, a stream (T,) cut
    into `n_samples` windows, or the `calib` text read with `tokenizer`."""
    from slimlm.core.calibrate import sample_windows
    from slimlm.core.data import load_tokens

    if calibration is None:
        if tokenizer is None:
            raise SlimError(f"{method} needs calibration data: pass tokenizer= (to read calib='{config.calib}') "
                            "or calibration= token ids")
        calibration = load_tokens(config.calib, tokenizer)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = min(config.seq_len, context) if context else config.seq_len  # never past the model's context
    return calibration if calibration.dim() == 2 else sample_windows(calibration, config.n_samples, seq_len, config.seed)


def _record_step(model: nn.Module, method: str, config: Any) -> None:
    recipe = list(getattr(model, "slimlm_recipe", []))
    recipe.append({"method": method, **config.to_dict()})
    model.slimlm_recipe = recipe


def prune(model: nn.Module, method: str = "magnitude", tokenizer=None, calibration: torch.Tensor | None = None,
          on_block: Callable[[int, int], None] | None = None, **settings: Any) -> nn.Module:
    """Prune `model` in place with a registered method and return it.

    Unstructured and n:m methods ('random', 'magnitude', 'taylor', 'wanda', 'sparsegpt') zero weights:
    `slimlm.prune(model, "wanda", sparsity=0.5, tokenizer=tok)` or `pattern="2:4"`. The record of what
    was pruned goes to `model.config.slimlm_sparsity` (and so to config.json when saved); pruned
    weights are exact zeros, which later quantization (RTN, GPTQ, AWQ) keeps.
    Structured methods ('heads', 'channels', 'blocks') remove that fraction of units and shrink the
    model: `slimlm.prune(model, "channels", sparsity=0.25, importance="activation", tokenizer=tok)`."""
    from slimlm.pruning.methods import get_pruner, needs_samples
    from slimlm.pruning.unstructured import sparsity_record

    p = get_pruner(method)
    config = p.config_cls.from_dict(settings)
    layers = config.targets(model) if not p.structured else None
    samples = _calibration_samples(model, method, config, tokenizer, calibration) if needs_samples(p, config) else None
    p.apply(model, config, samples, on_block)
    if layers is not None:
        model.config.slimlm_sparsity = sparsity_record(model, method, config, layers)
    else:  # the new shapes are in the config itself; this says how they were chosen
        model.config.slimlm_structured = {"method": method, "sparsity": config.sparsity, "importance": config.importance}
    _record_step(model, method, config)
    return model


def apply_recipe(model: nn.Module, recipe: list[dict[str, Any]] | str | os.PathLike, tokenizer=None,
                 on_block: Callable[[int, int], None] | None = None) -> nn.Module:
    """Run each step `{"method": ..., **settings}` of a recipe (a list, or a YAML file) on `model`, in place.
    Calibrated steps read their `calib` data with `tokenizer`."""
    from slimlm.core.recipe import load_recipe, validate_recipe

    from slimlm.pruning.methods import PRUNERS, get_pruner

    get_pruner("magnitude")  # fills the registry
    steps = validate_recipe(recipe) if isinstance(recipe, list) else load_recipe(recipe)
    for step in steps:
        method = step.pop("method")
        verb = prune if method in PRUNERS.names() else quantize
        verb(model, method, tokenizer=tokenizer, on_block=on_block, **step)
    return model


def evaluate(model: nn.Module, tokenizer, data: str | os.PathLike = "demo", reference: nn.Module | None = None,
             max_length: int | None = None, stride: int | None = None, max_tokens: int | None = None,
             on_progress: Callable[[int, int], None] | None = None):
    """Perplexity on `data` (file or 'demo'), plus KL and top-1 agreement against `reference` if given."""
    from slimlm.core.data import load_tokens
    from slimlm.eval.perplexity import evaluate_quality

    ids = load_tokens(data, tokenizer, max_tokens)
    return evaluate_quality(model, ids, reference, max_length, stride, on_progress)


def bench(model: nn.Module, **settings: Any):
    """Prefill/decode speed, time to first token, achieved GB/s, peak memory (see eval.speed)."""
    from slimlm.eval.speed import BenchSettings, measure_speed

    return measure_speed(model, BenchSettings(**settings))


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             on_text: Callable[[str], None] | None = None) -> str:
    """Continue `prompt`; greedy unless temperature > 0. `on_text` streams the pieces."""
    from slimlm.engine.generate import SamplingParams, generate_text

    if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise SlimError("need max_new_tokens >= 1, temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
    return generate_text(model, tokenizer, prompt, params, on_text)


def compress(model: str | os.PathLike = "demo", variants: tuple[str, ...] | None = None, data: str | os.PathLike = "demo",
             out: str | os.PathLike | None = None, overwrite: bool = False, run_bench: bool = True,
             bench_settings: dict | None = None,
             max_tokens: int | None = None, max_length: int | None = None, progress: Progress | None = None,
             calib: str | os.PathLike = "demo"):
    """The main job: build each variant of `model`, save and reload it, measure it, return the Report.

    Every variant is written to disk and measured as reloaded (so the report describes the files a
    user would ship); with `out`, the variants and report.md/json are kept under that folder.
    Calibrated variants (gptq-*) draw their calibration windows from `calib`; keep it disjoint from
    `data` (e.g. `file.txt@0:200` and `file.txt@200:`).
    """
    from slimlm.core.data import load_tokens
    from slimlm.core.files import atomic_folder, check_output_path
    from slimlm.eval.report import Report
    from slimlm.eval.speed import BenchSettings
    from slimlm.presets import CALIBRATED, DEFAULT_VARIANTS, describe, preset

    variants = tuple(variants or DEFAULT_VARIANTS)
    recipes = {name: preset(name) for name in variants}
    for recipe in recipes.values():
        for step in recipe:
            if step["method"] in CALIBRATED:
                step["calib"] = str(calib)
    settings = BenchSettings(**(bench_settings or {})) if run_bench else None
    if out is not None:
        check_output_path(out, overwrite)
    progress = progress or (lambda task, done, total: None)
    original, tokenizer = load(model, dtype=torch.float32)
    ids = load_tokens(data, tokenizer, max_tokens)
    report = Report(model=str(model), data=str(data))
    scratch_parent = Path(out).expanduser().parent if out is not None else None  # same filesystem: rename works
    with tempfile.TemporaryDirectory(prefix=".slimlm-", dir=scratch_parent) as scratch:
        root = Path(scratch) / "variants"
        root.mkdir()
        for name, recipe in recipes.items():
            progress(f"{name}: compress", 0, 1)
            variant, _ = load(model, dtype=torch.float32)  # a fresh copy from disk (mmap'd), not a deepcopy
            variant = apply_recipe(variant, recipe, tokenizer,
                                   on_block=lambda d, t, name=name: progress(f"{name}: calibrate", d, t))
            folder = save(variant, root / name, tokenizer)
            reloaded, _ = load(folder)
            diff = _roundtrip_diff(variant, reloaded, ids)
            del variant
            report.variants.append(measure_variant(
                reloaded, name, describe(recipe), ids, original, settings, max_length, progress, folder, diff))
            progress(f"{name}: done", 1, 1)
            del reloaded
        if out is not None:
            with atomic_folder(out, overwrite) as tmp:
                for name in recipes:
                    (root / name).rename(tmp / name)
                for folder in [tmp] + [tmp / name for name in recipes]:  # each variant carries the report
                    (folder / "report.md").write_text(report.to_markdown())
                    (folder / "report.json").write_text(report.to_json() + "\n")
                _try_plot(report, tmp / "report.png")
    return report


def measure_variant(model: nn.Module, name: str, description: str, ids: torch.Tensor, reference: nn.Module | None,
                    settings=None, max_length: int | None = None, progress: Progress | None = None,
                    folder: Path | None = None, roundtrip_diff: float | None = None):
    """Every report figure for one model: quality (vs reference), size, speed (when settings given)."""
    from slimlm.core.files import folder_bytes
    from slimlm.eval.perplexity import evaluate_quality
    from slimlm.eval.report import VariantResult
    from slimlm.eval.size import measure_size
    from slimlm.eval.speed import measure_speed

    progress = progress or (lambda task, done, total: None)
    quality = evaluate_quality(model, ids, reference, max_length,
                               on_progress=lambda d, t: progress(f"{name}: evaluate", d, t))
    speed = None
    if settings is not None:
        progress(f"{name}: benchmark", 0, 1)
        speed = measure_speed(model, settings).to_dict()
    return VariantResult(name=name, description=description, quality=quality.to_dict(), size=measure_size(model).to_dict(),
                         speed=speed, disk_bytes=folder_bytes(folder) if folder else None,
                         roundtrip_max_abs_diff=roundtrip_diff)


@torch.no_grad()
def _roundtrip_diff(model: nn.Module, reloaded: nn.Module, ids: torch.Tensor) -> float:
    """Largest logit difference between the in-memory model and its saved-and-reloaded copy."""
    probe = ids[: min(64, ids.numel())][None]
    diff = (model(probe).logits.float() - reloaded(probe).logits.float()).abs().max().item()
    if diff != 0.0:  # not a user error: a bug in save/load
        raise RuntimeError(f"saved model does not reproduce the in-memory logits (max diff {diff:g})")
    return diff


def _try_plot(report, path: Path) -> None:
    """Write report.png when matplotlib (the `report` extra) is installed; log a hint otherwise."""
    import importlib.util
    import logging

    if importlib.util.find_spec("matplotlib") is None:
        logging.getLogger(__name__).warning("no report.png: pip install 'slimlm[report]' (matplotlib) for plots")
        return
    from slimlm.eval.plots import plot_report

    plot_report(report, path)


def distill(student: nn.Module, teacher: nn.Module | None, tokenizer, data: str = "demo", eval_data: str | None = None,
            out: str | os.PathLike | None = None, resume: bool = False,
            on_step: Callable[[int, dict], None] | None = None, **settings: Any) -> list[dict]:
    """Train `student` in place to match `teacher` (α·hard + (1−α)·T²·KL) on text `data`; returns the
    history. Without a teacher this is plain fine-tuning. Settings: see `distillation.trainer.TrainConfig`
    (steps, lr, batch_size, grad_accum, seq_len, alpha, temperature, ...). `out` keeps checkpoints,
    history.json and loss.png; `resume=True` continues from its checkpoint."""
    from slimlm.distillation.data import load_blocks
    from slimlm.distillation.trainer import TrainConfig, train

    config = TrainConfig.from_dict(settings)
    context = getattr(student.config, "max_position_embeddings", None) or getattr(student.config, "n_positions", None)
    if context and config.seq_len > context:
        raise SlimError(f"seq_len {config.seq_len} is longer than the model's context of {context} tokens; lower --seq-len")
    train_blocks = load_blocks(data, tokenizer, config.seq_len)
    eval_blocks = load_blocks(eval_data, tokenizer, config.seq_len) if eval_data else None
    return train(student, train_blocks, eval_blocks, config, teacher, out, resume, on_step)


def finetune(model: nn.Module, tokenizer, data: str = "demo", eval_data: str | None = None,
             out: str | os.PathLike | None = None, qat: bool = False, teacher: nn.Module | None = None,
             lora: int = 0, lora_alpha: float = 16.0, lora_targets: tuple[str, ...] = ("*",),
             **settings: Any) -> list[dict]:
    """Recovery fine-tuning after compression, in place: pruned weights stay zero; with `qat=True`
    quantized layers train through their quantization grid (straight-through) and are quantized
    back at the end; with `lora=r` only rank-r adapters train on the frozen (possibly quantized)
    model and are merged at the end. A teacher (e.g. the uncompressed model) turns it into distillation."""
    from slimlm.distillation.lora import add_lora_, merge_lora_
    from slimlm.distillation.qat import convert_qat_, prepare_qat_

    if qat and lora:
        raise SlimError("choose QAT or LoRA, not both")
    if qat:
        prepare_qat_(model)
    if lora:
        add_lora_(model, lora, lora_alpha, tuple(lora_targets))
    try:
        return distill(model, teacher, tokenizer, data, eval_data, out, **settings)
    finally:
        if qat:
            convert_qat_(model)
        if lora:
            merge_lora_(model)
