"""The public verbs: load, save, quantize, prune, apply, distill, finetune, evaluate, bench, generate,
serve (compress, the main job, is a workflow over these: `workflows.py`).

Each resolves names to configs and calls the packages below; none of them parses command lines.
Compression steps come from one table (`core/steps.py`), keyed by config class: `quantize` and
`prune` take a config object or a method name with its settings, and `apply` runs a recipe of either.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimlm.core.config import Config
from slimlm.core.errors import SlimError

log = logging.getLogger(__name__)

OnBlock = Callable[[int, int], None]  # (blocks done, total)


def load(path: str | os.PathLike = "demo", dtype: torch.dtype | str | None = None, device: str = "cpu",
         tp: int = 1, pp: int = 1, split_head: bool = True, micro_batches: int = 0):
    """Load `(model, tokenizer)` from 'demo' or a local Hugging Face folder (compressed or not).

    tp / pp > 1 spread the model over that many processes (tensor / pipeline parallel, on
    torch.distributed; started here, or joined under torchrun): the model returned is this process's
    part, which `generate`, `bench` and `serve` run across all of them (`model.slimlm_parallel.close()`
    stops the others; they stop at exit too). split_head: with tp, split the output head along the
    vocabulary (else every rank holds all of it). micro_batches: with pp, how many micro-batches a
    decode step is split into (0: one per stage)."""
    from slimlm.core.model_io import load_model

    if tp > 1 or pp > 1:
        from slimlm.parallel.group import ParallelConfig
        from slimlm.parallel.launch import open_model

        return open_model(str(path), ParallelConfig(tp=tp, pp=pp, split_head=split_head,
                                                         micro_batches=micro_batches), dtype, device)
    return load_model(path, dtype=dtype, device=device)


SAVE_FORMATS = ("auto", "slimlm", "compressed-tensors")


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         recipe: list[dict] | None = None, report: Any = None, format: str = "auto") -> Path:
    """Save `model` as a Hugging Face folder at `path` (atomically), with its recipe and report.

    format: 'compressed-tensors' (int4/int8 weight-only layers; plain transformers and vLLM load
    the folder), 'slimlm' (every scheme; `slimlm.load` reads it), or 'auto': compressed-tensors
    when the model's layers can be expressed in it, else slimlm's format."""
    from slimlm.core import format as F
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
    if getattr(model.config, F.SPARSITY, None):
        from slimlm.pruning.storage import encode_sparse_ as encoder
    return save_model(model, path, tokenizer, extra_files=extra, overwrite=overwrite, exporter=exporter, encoder=encoder)


def export(model: nn.Module, out: str | os.PathLike, tokenizer, format: str = "gguf", overwrite: bool = False,
           **settings: Any):
    """Write `model` in another tool's format (atomically): format 'gguf' (one file for llama.cpp,
    Ollama, LM Studio: quantized layers copied exactly as Q8_0/Q4_0/Q4_1 where they can be; `type`
    re-quantizes the others; returns a `GGUFExport` saying what was written and what it cost) or 'hf'
    (a dense float folder; dequantizes `model` in place; returns its path). Settings: `ExportConfig`."""
    import tempfile

    from slimlm.exporters.config import ExportConfig

    config = ExportConfig.from_dict({"format": format, **settings})
    if config.format == "hf":
        from slimlm.exporters.hf import export_hf

        return export_hf(model, tokenizer, out, overwrite=overwrite)
    from slimlm.core.data import demo_corpus_path, load_tokens
    from slimlm.core.layers import context_length
    from slimlm.exporters.gguf import export_gguf

    def kl_tokens():  # read only when a layer was re-quantized
        window = min(128, context_length(model))
        ids = load_tokens(demo_corpus_path(), tokenizer, max_tokens=window * config.kl_samples)
        rows = ids.numel() // window
        return ids[: rows * window].view(rows, window) if rows else None

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return export_gguf(model, folder, out, overwrite=overwrite, requantize=config.type,
                           float_type=config.float_type, kl_tokens=kl_tokens if config.kl_samples else None)


def quantize(model: nn.Module, method: str | Config = "rtn", tokenizer=None, calibration: torch.Tensor | None = None,
             on_block: OnBlock | None = None, **settings: Any) -> nn.Module:
    """Quantize `model` in place and return it.

    `method` is a config object (`slimlm.quantize(model, GPTQConfig(bits=4))`) or a method name with
    its settings (`slimlm.quantize(model, "rtn", bits=4, group_size=32, exclude=["*.mlp.down_proj"])`).
    Calibrated methods (gptq, awq, smoothquant) read `calib` (a text file or 'demo') with
    `tokenizer`, or take `calibration`, token ids (n, T) or (T,) from which `n_samples` windows are drawn.
    """
    return _run_step(model, method, settings, "quantize", tokenizer, calibration, on_block)


def prune(model: nn.Module, method: str | Config = "magnitude", tokenizer=None, calibration: torch.Tensor | None = None,
          on_block: OnBlock | None = None, **settings: Any) -> nn.Module:
    """Prune `model` in place and return it (a config object or a method name with its settings).

    Unstructured and n:m methods ('random', 'magnitude', 'taylor', 'wanda', 'sparsegpt') zero weights:
    `slimlm.prune(model, "wanda", sparsity=0.5, tokenizer=tok)` or `pattern="2:4"`. The record of what
    was pruned goes to `model.config.slimlm_sparsity` (and so to config.json when saved); pruned
    weights are exact zeros, which later quantization (RTN, GPTQ, AWQ) keeps.
    Structured methods ('heads', 'channels', 'blocks') remove that fraction of units and shrink the
    model: `slimlm.prune(model, "channels", sparsity=0.25, importance="activation", tokenizer=tok)`."""
    return _run_step(model, method, settings, "prune", tokenizer, calibration, on_block)


def apply(model: nn.Module, recipe: list[dict[str, Any]] | list[Config] | str | os.PathLike, tokenizer=None,
          on_block: OnBlock | None = None) -> nn.Module:
    """Run each step of a recipe on `model`, in place, and return it: a list of configs or of
    `{"method": name, **settings}` dicts, or a YAML file of them (quantization and pruning alike).
    Calibrated steps read their `calib` data with `tokenizer`."""
    from slimlm.core.recipe import load_recipe, validate_recipe

    if isinstance(recipe, (str, os.PathLike)):
        steps: list = load_recipe(recipe)
    elif isinstance(recipe, list) and recipe and all(isinstance(s, Config) for s in recipe):
        steps = list(recipe)
    else:
        steps = validate_recipe(recipe)
    from slimlm.core.steps import STEPS

    found = [STEPS.for_config(s) if isinstance(s, Config) else STEPS.get(s["method"]) for s in steps]
    original = None
    if any(step.needs_original for step in found):  # e.g. `recover` distills from the model as it came
        import copy

        original = copy.deepcopy(model).eval()
    for step in steps:
        if isinstance(step, Config):
            _run_step(model, step, {}, None, tokenizer, None, on_block, original)
        else:
            settings = dict(step)
            _run_step(model, settings.pop("method"), settings, None, tokenizer, None, on_block, original)
    return model


def _run_step(model: nn.Module, method: str | Config, settings: dict[str, Any], kind: str | None, tokenizer,
              calibration: torch.Tensor | None, on_block: OnBlock | None, original: nn.Module | None = None) -> nn.Module:
    from slimlm.core.steps import STEPS

    step, config = STEPS.resolve(method, settings, kind)
    samples = _calibration_samples(model, step.name, config, tokenizer, calibration) if step.needs_samples(config) else None
    if step.needs_original:
        step.apply(model, config, samples, on_block, original=original)
    else:
        step.apply(model, config, samples, on_block)
    model.slimlm_recipe = [*getattr(model, "slimlm_recipe", []), {"method": step.name, **config.to_dict()}]
    return model


def _calibration_samples(model: nn.Module, method: str, config: Any, tokenizer, calibration: torch.Tensor | None):
    """Token windows (n, T) for a calibrated method: given ids (n, T) as they are, a stream (T,) cut
    into `n_samples` windows, or the `calib` text read with `tokenizer`."""
    from slimlm.core.calibrate import sample_windows
    from slimlm.core.data import load_tokens
    from slimlm.core.layers import context_length

    if calibration is None:
        if tokenizer is None:
            raise SlimError(f"{method} needs calibration data: pass tokenizer= (to read calib='{config.calib}') "
                            "or calibration= token ids")
        calibration = load_tokens(config.calib, tokenizer)
    from slimlm.core.distributed import my_share

    context = context_length(model)
    seq_len = min(config.seq_len, context) if context else config.seq_len  # never past the model's context
    windows = calibration if calibration.dim() == 2 else sample_windows(calibration, config.n_samples, seq_len, config.seed)
    return my_share(windows, config.batch_size)  # under torch.distributed, this process's share


def eval_tasks(model: nn.Module, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
               num_fewshot: int | None = None) -> dict:
    """Task accuracy through the lm-evaluation-harness on the loaded (compressed) model: {task: {metric:
    value}} and the samples (`pip install 'slimlm[eval]'`; `eval/tasks.py`). The same numbers as `lm-eval
    --model local-completions` against `slimlm serve`."""
    from slimlm.eval.tasks import run_tasks

    return run_tasks(model, tokenizer, tasks, include_path, limit, num_fewshot)


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
             on_text: Callable[[str], None] | None = None, draft=None, num_speculative: int = 4,
             spec_stats=None) -> str:
    """Continue `prompt`; greedy unless temperature > 0. `on_text` streams the pieces. draft: speculative
    decoding with 'ngram' (prompt lookup) or a draft model (or its folder) of the same tokenizer, proposing
    `num_speculative` tokens per step (same greedy output; same distribution when sampling); its
    acceptance statistics fill `spec_stats` (`slimlm.engine.speculative.SpecStats`) when given."""
    from slimlm.engine.generate import generate_text
    from slimlm.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
    if params.max_new_tokens < 1:
        raise SlimError(f"max_new_tokens {max_new_tokens} must be at least 1")
    if draft is None:
        return generate_text(model, tokenizer, prompt, params, on_text)
    return generate_text(model, tokenizer, prompt, params, on_text, draft=draft, num_speculative=num_speculative,
                         spec_stats=spec_stats)


def distill(student: nn.Module, teacher: nn.Module | None, tokenizer, data: str = "demo", eval_data: str | None = None,
            out: str | os.PathLike | None = None, resume: bool = False,
            on_step: Callable[[int, dict], None] | None = None, **settings: Any) -> list[dict]:
    """Train `student` in place to match `teacher` (α·hard + (1−α)·T²·KL) on text `data`; returns the
    history. Without a teacher this is plain fine-tuning. Settings: see `distillation.trainer.TrainConfig`
    (steps, lr, batch_size, grad_accum, seq_len, alpha, temperature, ...). `out` keeps checkpoints,
    history.json and loss.png; `resume=True` continues from its checkpoint."""
    from slimlm.core.layers import context_length
    from slimlm.distillation.data import load_blocks
    from slimlm.distillation.trainer import TrainConfig, train

    config = TrainConfig.from_dict(settings)
    context = context_length(student)
    if context and config.seq_len > context:
        raise SlimError(f"seq_len {config.seq_len} is longer than the model's context of {context} tokens; lower --seq-len")
    train_blocks = load_blocks(data, tokenizer, config.seq_len)
    eval_blocks = load_blocks(eval_data, tokenizer, config.seq_len) if eval_data else None
    return train(student, train_blocks, eval_blocks, config, teacher, out, resume, on_step)


def finetune(model: nn.Module, tokenizer, data: str = "demo", eval_data: str | None = None,
             out: str | os.PathLike | None = None, qat: bool = False, teacher: nn.Module | None = None,
             lora: int = 0, lora_alpha: float = 16.0, lora_targets: tuple[str, ...] = ("*",),
             resume: bool = False, on_step: Callable[[int, dict], None] | None = None, **settings: Any) -> list[dict]:
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
        return distill(model, teacher, tokenizer, data, eval_data, out, resume=resume, on_step=on_step, **settings)
    finally:
        if qat:
            convert_qat_(model)
        if lora:
            merge_lora_(model)


def serve(model: str | os.PathLike = "demo", on_ready: Callable[[list[str], str], None] | None = None,
          **settings: Any) -> None:
    """Serve a model folder (or 'demo', or a folder of model folders) with the OpenAI-compatible API
    until SIGTERM/SIGINT. Settings: the fields of `slimlm.server.config.ServeConfig`, as `slimlm serve`'s
    flags (host, port, api_key, slots, max_len, max_queue, max_tokens, timeout, ...), checked before
    anything loads. on_ready(model names, base URL) runs once serving starts."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SlimError("serving needs the 'serve' extra: pip install 'slimlm[serve]'") from None
    from slimlm.server.server import run_server

    run_server(str(model), on_ready=on_ready, **settings)
