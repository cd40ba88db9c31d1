"""The before/after report: one row per model variant, as a markdown table and as JSON."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VariantResult:
    name: str
    description: str
    quality: dict[str, Any]
    size: dict[str, Any]
    speed: dict[str, Any] | None = None
    disk_bytes: int | None = None
    roundtrip_max_abs_diff: float | None = None  # saved -> reloaded logits vs in-memory

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    model: str
    data: str
    variants: list[VariantResult] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=lambda: environment())

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "environment": self.environment,
                "variants": [v.to_dict() for v in self.variants]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def rows(self) -> list[dict[str, str]]:
        """Formatted table rows (column -> text); ratios are against the first variant."""
        base = self.variants[0] if self.variants else None
        out = []
        for v in self.variants:
            q, s, sp = v.quality, v.size, v.speed or {}
            row = {
                "variant": v.name,
                "scheme": v.description,
                "ppl": f"{q['perplexity']:.3f}",
                "Δppl": _pct(q["perplexity"], base.quality["perplexity"]) if base else "",
                "KL": "" if q.get("kl") is None else f"{q['kl']:.5f}",
                "top-1": "" if q.get("top1") is None else f"{100 * q['top1']:.2f}%",
                "size MB": f"{(v.disk_bytes or s['weight_bytes']) / 1e6:.2f}",
                "bits/w": f"{s['linear_bits_per_weight']:.2f}",
            }
            if sp:
                decode = {int(k): t for k, t in sp["decode_tps"].items()}
                b0 = min(decode)
                base_decode = {int(k): t for k, t in (base.speed or {}).get("decode_tps", {}).items()}
                row.update({
                    "TTFT ms": f"{sp['ttft_ms']:.1f}",
                    "prefill tok/s": f"{sp['prefill_tps']:.0f}",
                    **{f"decode b{b} tok/s": f"{t:.1f}" for b, t in sorted(decode.items())},
                    "GB/s": f"{sp['decode_gbps']:.2f}",
                    f"decode vs {base.name}": f"{decode[b0] / base_decode[b0]:.2f}x" if b0 in base_decode else "",
                    "peak MB": f"{(s['weight_bytes'] + sp['peak_memory_bytes']) / 1e6:.1f}",
                })
            out.append(row)
        return out

    def to_markdown(self) -> str:
        rows = self.rows()
        if not rows:
            return "(no variants)\n"
        cols = list(dict.fromkeys(c for r in rows for c in r))
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
        env = self.environment
        notes = [
            f"Model `{self.model}`, evaluated on `{self.data}` "
            f"({self.variants[0].quality['tokens']} tokens). KL = mean KL(P_{self.variants[0].name} ‖ P) per token (nats); "
            f"top-1 = tokens whose most likely next token matches {self.variants[0].name}.",
            f"Size = weight files on disk; bits/w = stored bits per linear-layer weight (scales included). "
            f"Speed: medians, torch {env['torch']}, {env['threads']} threads, {env['cpu']}; peak MB = weights + peak RSS growth while benchmarking.",
        ]
        return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _pct(value: float, base: float) -> str:
    return f"{100 * (value - base) / base:+.2f}%"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "python": platform.python_version()}
