"""Report plots (matplotlib, optional): quality, size and speed of each variant side by side."""

from __future__ import annotations

from pathlib import Path


def plot_report(report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in report.variants]
    panels = [
        ("perplexity", [v.quality["perplexity"] for v in report.variants]),
        ("KL vs reference (nats/token)", [v.quality.get("kl") or 0.0 for v in report.variants]),
        ("size on disk (MB)", [(v.disk_bytes or v.size["weight_bytes"]) / 1e6 for v in report.variants]),
    ]
    if all(v.speed for v in report.variants):
        panels.append(("decode tokens/s (batch 1)", [v.speed["decode_tps"][min(v.speed["decode_tps"], key=int)] for v in report.variants]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(names, values, color="#4c72b0")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"slimlm: {report.model} on {report.data}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def try_plot_report(report, path: Path) -> None:
    """Write the report's plot when matplotlib (the `report` extra) is installed; log a hint otherwise."""
    import importlib.util
    import logging

    if importlib.util.find_spec("matplotlib") is None:
        logging.getLogger(__name__).warning("no %s: pip install 'slimlm[report]' (matplotlib) for plots", path.name)
        return
    plot_report(report, path)
