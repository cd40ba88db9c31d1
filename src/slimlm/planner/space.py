"""The names of `slimlm plan --search`'s space: the structures and the methods a candidate combines
(`search.Candidate`), checked by `PlanConfig` before any work."""

from __future__ import annotations

from slimlm.core.errors import SlimError

STRUCTURES = ("blocks", "channels", "heads")
METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def parse_structure(text: str) -> tuple[str, float]:
    """'channels:0.25' (or 'channels 0.25') -> ('channels', 0.25)."""
    kind, _, value = str(text).replace(" ", ":").partition(":")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if kind not in STRUCTURES or not 0 < fraction < 1:
        raise SlimError(f"structure '{text}' must be KIND:FRACTION with KIND one of {', '.join(STRUCTURES)} and "
                        "FRACTION in (0, 1), e.g. channels:0.25")
    return kind, fraction
