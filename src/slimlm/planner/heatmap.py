"""The sensitivity heat map: layers x treatments, colour = log10 of the KL each costs alone
(matplotlib, the `report` extra)."""

from __future__ import annotations

import math
from pathlib import Path

from slimlm.core.errors import SlimError
from slimlm.planner.sensitivity import Sensitivity


def draw_heatmap(sensitivity: Sensitivity, path: str | Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise SlimError("the heat map needs matplotlib: pip install 'slimlm[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [j for j, t in enumerate(sensitivity.treatments) if t != "keep"]
    values = [[math.log10(max(row[j], 1e-6)) if not math.isnan(row[j]) else float("nan") for j in shown]
              for row in sensitivity.kl]
    height = max(3.0, 0.22 * len(sensitivity.layers))
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(shown), height))
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(shown)), [sensitivity.treatments[j] for j in shown], rotation=45, ha="right")
    ax.set_yticks(range(len(sensitivity.layers)), sensitivity.layers, fontsize=6)
    fig.colorbar(image, ax=ax, label="log10 KL (nats/token) when only this layer is treated")
    ax.set_title("per-layer sensitivity")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120, format="png")
    plt.close(fig)
    return out
