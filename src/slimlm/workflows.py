"""Workflows built on the verbs: `compress` (the main job: every variant of a model built, saved,
reloaded and measured into one before/after report) and `compress_one` (what `slimlm quantize` and
`slimlm prune` do: one recipe, a report against the original, one saved folder)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimlm import api
from slimlm.core.config import Config

Progress = Callable[[str, int, int], None]  # (task, done, total)


def compress(model: str | os.PathLike = "demo", variants: tuple[str, ...] | None = None, data: str | os.PathLike = "demo",
             out: str | os.PathLike | None = None, overwrite: bool = False, run_bench: bool = True,
             bench_settings: dict | None = None, max_tokens: int | None = None, max_length: int | None = None,
             progress: Progress | None = None, calib: str | os.PathLike = "demo"):
    """The main job: build each variant of `model`, save and reload it, measure it, return the Report.

    Every variant is written to disk and measured as reloaded (so the report describes the files a
    user would ship); with `out`, the variants and report.md/json/png are kept under that folder.
    Calibrated variants (gptq-*, awq-*, w8a8) draw their calibration windows from `calib`; keep it
    disjoint from `data` (e.g. `file.txt@0:200` and `file.txt@200:`).
    """
    from slimlm.core.data import load_tokens
    from slimlm.core.files import atomic_folder, check_output_path
    from slimlm.eval.plots import try_plot_report
    from slimlm.eval.report import Report
    from slimlm.eval.speed import BenchSettings
    from slimlm.presets import DEFAULT_VARIANTS, describe, preset

    variants = tuple(variants or DEFAULT_VARIANTS)
    recipes = {name: preset(name, calib=str(calib)) for name in variants}
    settings = BenchSettings(**(bench_settings or {})) if run_bench else None
    if out is not None:
        check_output_path(out, overwrite)
    progress = progress or (lambda task, done, total: None)
    original, tokenizer = api.load(model, dtype=torch.float32)
    ids = load_tokens(data, tokenizer, max_tokens)
    report = Report(model=str(model), data=str(data))
    scratch_parent = Path(out).expanduser().parent if out is not None else None  # same filesystem: rename works
    with tempfile.TemporaryDirectory(prefix=".slimlm-", dir=scratch_parent) as scratch:
        root = Path(scratch) / "variants"
        root.mkdir()
        for name, recipe in recipes.items():
            progress(f"{name}: compress", 0, 1)
            variant, _ = api.load(model, dtype=torch.float32)  # a fresh copy from disk (mmap'd), not a deepcopy
            variant = api.apply(variant, recipe, tokenizer,
                                on_block=lambda d, t, name=name: progress(f"{name}: calibrate", d, t))
            folder = api.save(variant, root / name, tokenizer)
            reloaded, _ = api.load(folder)
            diff = roundtrip_diff(variant, reloaded, ids)
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
                try_plot_report(report, tmp / "report.png")
    return report


def compress_one(model: str | os.PathLike, recipe: list[dict[str, Any]] | list[Config], out: str | os.PathLike,
                 data: str | os.PathLike = "demo", eval_tokens: int = 2048, overwrite: bool = False,
                 save_format: str = "auto", progress: Progress | None = None, label: str = "compressed"):
    """Load `model`, apply `recipe`, measure it against the original on `eval_tokens` tokens of `data`
    (0: no report), and save it at `out` with its recipe and report. The output path is checked before
    any work starts. Returns (the compressed model, the report or None).

    Under torchrun (WORLD_SIZE > 1) every process calibrates on its share of the windows and the
    statistics are combined (`core/distributed.py`); rank 0 measures and saves."""
    from slimlm.core.data import load_tokens
    from slimlm.core.files import check_output_path
    from slimlm.eval.report import Report
    from slimlm.presets import describe

    progress = progress or (lambda task, done, total: None)
    rank = _join_process_group()
    try:
        if rank == 0:
            check_output_path(out, overwrite)
        compressed, tokenizer = api.load(model)
        original = ids = None
        if eval_tokens and rank == 0:
            ids = load_tokens(data, tokenizer, eval_tokens)
            original = api.load(model)[0]
        api.apply(compressed, recipe, tokenizer, on_block=lambda done, total: progress(f"{label}: blocks", done, total))
        report = None
        if rank == 0:
            if eval_tokens:
                report = Report(model=str(model), data=str(data))
                report.variants.append(measure_variant(original, "original", "as loaded", ids, original,
                                                       progress=progress))
                report.variants.append(measure_variant(compressed, label, describe(compressed.slimlm_recipe), ids,
                                                       original, progress=progress))
            api.save(compressed, out, tokenizer, overwrite=overwrite, report=report, format=save_format)
    finally:
        _leave_process_group()
    return compressed, report


def measure_variant(model: nn.Module, name: str, description: str, ids: torch.Tensor, reference: nn.Module | None,
                    settings=None, max_length: int | None = None, progress: Progress | None = None,
                    folder: Path | None = None, roundtrip_max_abs_diff: float | None = None):
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
                         roundtrip_max_abs_diff=roundtrip_max_abs_diff)


@torch.no_grad()
def roundtrip_diff(model: nn.Module, reloaded: nn.Module, ids: torch.Tensor) -> float:
    """Largest logit difference between the in-memory model and its saved-and-reloaded copy."""
    probe = ids[: min(64, ids.numel())][None]
    diff = (model(probe).logits.float() - reloaded(probe).logits.float()).abs().max().item()
    if diff != 0.0:  # not a user error: a bug in save/load
        raise RuntimeError(f"saved model does not reproduce the in-memory logits (max diff {diff:g})")
    return diff


def distill_to(teacher: str | os.PathLike, out: str | os.PathLike, student: str | os.PathLike | None = None,
               keep_blocks: list[int] | None = None, **kwargs: Any) -> tuple[list[dict], dict]:
    """Distil `teacher` into a student (a model folder, or a subset of the teacher's blocks, default every
    other one) and save it at `out`. kwargs: see `train_and_save`. Returns (history, summary)."""
    from slimlm.distillation.students import layer_subset

    teacher_model, tokenizer = api.load(teacher)
    student_model = api.load(student)[0] if student else layer_subset(teacher_model, keep_blocks)
    return train_and_save(lambda **kw: api.distill(student_model, teacher_model, tokenizer, **kw), student_model,
                          tokenizer, out, **kwargs)


def finetune_to(model: str | os.PathLike, out: str | os.PathLike, teacher: str | os.PathLike | None = None,
                qat: bool = False, lora: int = 0, lora_alpha: float = 16.0, lora_targets: tuple[str, ...] = ("*",),
                **kwargs: Any) -> tuple[list[dict], dict]:
    """Recovery fine-tuning of a (compressed) model folder (`api.finetune`: masks kept, QAT or LoRA), saved
    at `out`. kwargs: see `train_and_save`. Returns (history, summary)."""
    compressed, tokenizer = api.load(model)
    teacher_model = api.load(teacher)[0] if teacher else None
    return train_and_save(lambda **kw: api.finetune(compressed, tokenizer, qat=qat, teacher=teacher_model, lora=lora,
                                                    lora_alpha=lora_alpha, lora_targets=tuple(lora_targets), **kw),
                          compressed, tokenizer, out, **kwargs)


def train_and_save(train: Callable[..., list[dict]], model: nn.Module, tokenizer, out: str | os.PathLike,
                   data: str = "demo", eval_data: str | None = None, resume: bool = False, overwrite: bool = False,
                   on_step: Callable[[int, dict], None] | None = None, **settings: Any) -> tuple[list[dict], dict]:
    """Train (`train(data=, eval_data=, out=, resume=, on_step=, **settings)`) with checkpoints in
    OUT.training beside the output, then save the model at `out` with history.json and loss.png.
    Under torchrun (WORLD_SIZE > 1) every process joins the group and trains; rank 0 saves."""
    from slimlm.core.files import check_output_path

    rank = _join_process_group()
    if not resume and rank == 0:
        check_output_path(out, overwrite)
    work = Path(str(out) + ".training")  # checkpoints live beside the output until it is written
    try:
        history = train(data=data, eval_data=eval_data, out=work, resume=resume, on_step=on_step, **settings)
        last = history[-1] if history else {}
        evals = [h for h in history if "eval_ppl" in h]
        summary = {"out": str(out), "steps": last.get("step"), "train_loss": last.get("loss"),
                   "eval_ppl": evals[-1]["eval_ppl"] if evals else None, "tokens_per_s": last.get("tokens_per_s"),
                   "checkpoint": str(work)}
        if rank == 0:  # every process trained the same model; rank 0 saves
            api.save(model, out, tokenizer, overwrite=True)
            for name in ("history.json", "loss.png"):
                if (work / name).is_file():
                    (work / name).replace(Path(out) / name)
    finally:
        _leave_process_group()
    return history, summary


def _join_process_group() -> int:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo on CPU, NCCL on GPUs); returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def _leave_process_group() -> None:
    """Wait for every process, then leave the group (a process that exits inside it aborts gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
