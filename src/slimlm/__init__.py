"""slimlm: make causal language models smaller and faster, and prove it.

The public verbs: `load`, `save`, `quantize`, `prune`, `distill`, `finetune`, `evaluate`, `bench`,
`generate`, `compress`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "save", "quantize", "prune", "distill", "finetune", "evaluate", "bench", "generate", "compress", "SlimError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import slimlm` stays cheap (no torch/transformers import until a verb is used).
    if name == "SlimError":
        from slimlm.core.errors import SlimError

        return SlimError
    if name in __all__:
        from slimlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimlm' has no attribute '{name}'")
