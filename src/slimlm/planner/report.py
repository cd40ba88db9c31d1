"""One self-contained HTML page for a plan: the budgets, the chosen recipe, predicted against
measured, the size / predicted-KL front as a plot and a table, and the sensitivity heat map. Images
are embedded (base64 PNG), so the file opens in a browser with nothing beside it; without matplotlib
the page has the tables and says how to get the plots."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return base64.b64encode(buffer.getvalue()).decode()


def _front_plot(result) -> str:
    import matplotlib.pyplot as plt

    points = result.front.points
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([p.bytes / 1e6 for p in points], [max(p.loss, 1e-6) for p in points], ".-", ms=3, label="front (predicted)")
    ax.plot([result.point.bytes / 1e6], [max(result.point.loss, 1e-6)], "o", color="C3", label="chosen (predicted)")
    measured = [c for c in result.checks if c.get("kl") is not None]
    if measured:
        ax.plot([c["bytes"] / 1e6 for c in measured], [max(c["kl"], 1e-6) for c in measured], "x", color="C2", ms=9,
                label="chosen (measured)")
    rows = result.front_rows(40) if result.speed is not None else []
    if rows and "predicted decode s/step" in rows[0]:  # the third axis: each point's predicted decode speed
        sizes = [float(r["MB"]) for r in rows]
        speeds = [1 / float(r["predicted decode s/step"]) for r in rows]
        twin = ax.twinx()
        twin.plot(sizes, speeds, "s:", ms=3, color="C1", label="decode tok/s (predicted)")
        twin.set_ylabel("batch-1 decode tok/s (predicted)")
        twin.legend(loc="upper center")
    ax.set_yscale("log")
    ax.set_xlabel("block linear weights (MB)")
    ax.set_ylabel("KL (nats/token)")
    ax.set_title("size / quality front")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _heatmap(result) -> str:
    import tempfile

    from slimlm.planner.heatmap import draw_heatmap

    with tempfile.TemporaryDirectory() as tmp:
        path = draw_heatmap(result.sensitivity, Path(tmp) / "heatmap.png")
        return base64.b64encode(path.read_bytes()).decode()


def _table(rows: list[dict], caption: str = "") -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(result, title: str, budgets, searched=None) -> str:
    from slimlm.planner.check import summarize
    from slimlm.core.recipe import dump_recipe

    summary = summarize(result, budgets)
    asked = {"size": f"{budgets.max_bytes / 1e6:.3f} MB" if budgets.max_bytes else "",
             "predicted KL": f"{budgets.max_kl:g}" if budgets.max_kl else "",
             "decode (tok/s, batch 1)": f">= {budgets.min_decode:g}" if budgets.min_decode else "",
             "time to first token": f"<= {budgets.max_ttft * 1e3:g} ms" if budgets.max_ttft else "",
             f"throughput ({budgets.streams} streams)": f">= {budgets.min_throughput:g} tok/s" if budgets.min_throughput
             else ("as high as possible" if budgets.maximize else "")}
    counts: dict[str, int] = {}
    for t in result.treatments().values():
        counts[t] = counts.get(t, 0) + 1
    parts = [f"<h1>{html.escape(title)}</h1>",
             _table([{"budget": k, "value": v} for k, v in asked.items() if v], "budgets"),
             f"<p>Chosen: {result.point.bytes / 1e6:.4f} MB of block linear weights, predicted KL "
             f"{summary['predicted_kl']:.4f}; {html.escape(', '.join(f'{n} layers {t}' for t, n in sorted(counts.items())))}.</p>"]
    if searched is not None:
        parts.append(f"<h2>search</h2><p>Winner: {html.escape(searched.winner)} (successive halving by "
                     f"{html.escape(searched.objective)}; the last rung on held-out text).</p>")
        notes = [{"candidate": k, "note": t["note"]} for k, t in searched.trials.items() if t.get("note")]
        parts.append(_table(searched.rows(), "candidates per rung"))
        parts.append(_table(notes, "candidates that could not meet the budgets"))
    if summary["table"]:
        parts.append(_table(summary["table"], "predicted against measured (the chosen plan, built and run on this machine)"))
    if result.speed is not None:
        sp = result.speed
        parts.append(_table([{"uniform model": label, **{f"{fig} measured (ms)": f"{v[fig] * 1e3:.3f}" for fig in v},
                              **{f"{fig} model (ms)": f"{sp.fitted.get(label, {}).get(fig, float('nan')) * 1e3:.3f}" for fig in v}}
                             for label, v in sp.reference.items()],
                            "speed model: step = sum over the layers of b(format) x the layer's timing here"))
    for note in summary["notes"] + ([summary["missed"]] if summary["missed"] else []):
        parts.append(f"<p><b>{html.escape(note)}</b></p>")
    try:
        import matplotlib

        matplotlib.use("Agg")
        parts.append(f'<h2>front</h2><img alt="size / quality front" src="data:image/png;base64,{_front_plot(result)}">')
        parts.append(f'<h2>sensitivity</h2><img alt="sensitivity heat map" src="data:image/png;base64,{_heatmap(result)}">')
    except ImportError:
        parts.append("<p>(plots need matplotlib: pip install 'slimlm[report]')</p>")
    points = result.front.points
    parts.append(_table(result.front_rows(20), f"the size / predicted-KL front ({len(points)} points, "
                                               f"{'exact' if result.front.exact else 'thinned'}; speed predicted "
                                               "per point where a speed budget was given)"))
    parts.append(f"<h2>recipe</h2><pre>{html.escape(dump_recipe(result.recipe))}</pre>")
    parts.append(_table([{"layer": layer, **{t: f"{row[j]:.2e}" for j, t in enumerate(result.sensitivity.treatments)
                                             if t != "keep"}}
                         for layer, row in zip(result.sensitivity.layers, result.sensitivity.kl)],
                        "per-layer sensitivity: KL when only this layer is treated"))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}caption{font-weight:bold;text-align:left}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(result, path: str | Path, title: str, budgets, searched=None) -> Path:
    out = Path(path)
    out.write_text(render(result, title, budgets, searched), encoding="utf-8")
    return out
