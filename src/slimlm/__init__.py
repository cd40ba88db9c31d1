"""slimlm: make causal language models smaller and faster, and prove it.

The public verbs (each modifies a model in place and returns it, or returns what it measured):

    load(path)                         -> (model, tokenizer): 'demo' or a local Hugging Face folder
    save(model, path, tokenizer)       an ordinary HF folder (compressed-tensors or slimlm format), atomically
    quantize(model, method, ...)       RTN, GPTQ, AWQ, SmoothQuant W8A8, cast (a config object or a name)
    prune(model, method, ...)          magnitude, random, taylor, wanda, sparsegpt; n:m; heads, channels, blocks
    apply(model, recipe)               a recipe (YAML file, dicts or configs) of quantization and pruning steps
    distill(student, teacher, tok)     knowledge distillation (α·hard + (1−α)·T²·KL), data parallel under torchrun
    finetune(model, tok, ...)          recovery fine-tuning: masks kept, QAT, or LoRA
    evaluate(model, tok, data)         perplexity, KL and top-1 agreement against a reference
    bench(model)                       TTFT, prefill/decode tokens/s, achieved GB/s, peak memory
    generate(model, tok, prompt)       a continuation (streamed with on_text)
    compress(model)                    the main job: variants built, saved, reloaded and measured in one report
    serve(model)                       the OpenAI-compatible server with continuous batching
    export(model, out, tok)            GGUF for llama.cpp/Ollama (codes copied exactly) or a dense HF folder

Step configs for `quantize`, `prune` and `apply`: CastConfig, RTNConfig, GPTQConfig, AWQConfig,
SmoothQuantConfig, MagnitudeConfig, RandomConfig, TaylorConfig, WandaConfig, SparseGPTConfig,
HeadsConfig, ChannelsConfig, BlocksConfig, RecoverConfig (recipes only: brief distillation from the
original after the steps before it). Settings of `distill`/`finetune`: TrainConfig; of `bench`:
BenchSettings; of `generate` and the server: SamplingParams (and SpecStats, speculative decoding's counts); of `load` across processes (tp, pp):
ParallelConfig; of `export`: ExportConfig.
"""

from __future__ import annotations

__version__ = "0.1.0"

_VERBS = {name: "slimlm.api" for name in ("load", "save", "quantize", "prune", "apply", "distill", "finetune", "evaluate",
                                          "bench", "generate", "serve", "export")}
_VERBS["compress"] = "slimlm.workflows"
_CONFIGS = {
    "CastConfig": "slimlm.quant.cast", "RTNConfig": "slimlm.quant.rtn", "GPTQConfig": "slimlm.quant.gptq",
    "AWQConfig": "slimlm.quant.awq", "SmoothQuantConfig": "slimlm.quant.smoothquant",
    "MagnitudeConfig": "slimlm.pruning.config", "RandomConfig": "slimlm.pruning.config",
    "TaylorConfig": "slimlm.pruning.config", "WandaConfig": "slimlm.pruning.config",
    "SparseGPTConfig": "slimlm.pruning.config", "HeadsConfig": "slimlm.pruning.structured",
    "ChannelsConfig": "slimlm.pruning.structured", "BlocksConfig": "slimlm.pruning.structured",
    "RecoverConfig": "slimlm.distillation.recover",
}
_OTHER = {"SlimError": "slimlm.core.errors", "TrainConfig": "slimlm.distillation.trainer",
          "BenchSettings": "slimlm.eval.speed", "SamplingParams": "slimlm.engine.sampling",
          "SpecStats": "slimlm.engine.speculative",
          "ParallelConfig": "slimlm.parallel.group", "ExportConfig": "slimlm.exporters.config"}
_LAZY = {**_VERBS, **_CONFIGS, **_OTHER}

__all__ = [*_VERBS, *_CONFIGS, *_OTHER, "__version__"]


def __getattr__(name: str):
    # Lazy: `import slimlm` stays cheap (no torch/transformers import until a verb is used).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimlm' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
