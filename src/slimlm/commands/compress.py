"""`slimlm compress`: the main job. Builds fp32/bf16/int8/int4 variants, measures each, prints the report."""

from __future__ import annotations

import argparse

from slimlm.commands._common import print_json, print_table, progress_bar, quiet_libraries
from slimlm.commands._flags import add_config_flags, settings_from_args


def bench_settings():
    from slimlm import BenchSettings

    return BenchSettings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="Hugging Face model folder, or 'demo' (default)")
    p.add_argument("--variants", default=None,
                   help="comma-separated presets (default fp32,bf16,int8,int4; also fp16,int4-g128,int3,int2,gptq-int4,gptq-int3)")
    p.add_argument("--data", default="demo", help="evaluation text: .txt, .jsonl, or 'demo' (the built-in held-out corpus)")
    p.add_argument("--calib", default="demo", help="calibration text for gptq-* variants (file.txt@0:200 takes documents 0-199)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    p.add_argument("--window", type=int, default=None, help="perplexity window length (default min(context, 512))")
    p.add_argument("-o", "--out", default=None, help="keep the variants and report.md/json/png in this folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-bench", action="store_true", help="skip the speed measurements")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_config_flags(p.add_argument_group("speed measurement"), [bench_settings()], skip=("engine",))


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from slimlm.workflows import compress

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants else None
    bench = settings_from_args(args, bench_settings())
    with progress_bar(not args.json) as update:
        report = compress(args.model, variants, data=args.data, out=args.out, overwrite=args.overwrite,
                          run_bench=not args.no_bench, bench_settings=bench, max_tokens=args.max_tokens,
                          max_length=args.window, progress=update, calib=args.calib)
    if args.json:
        print_json(report.to_dict())
        return 0
    rows = report.rows()
    quality_cols = ["variant", "scheme", "ppl", "Δppl", "KL", "top-1", "size MB", "bits/w"]
    print_table([{c: r[c] for c in quality_cols} for r in rows], title=f"{report.model}: quality and size")
    if any("TTFT ms" in r for r in rows):
        print_table([{"variant": r["variant"], **{c: v for c, v in r.items() if c not in quality_cols}} for r in rows],
                    title=f"{report.model}: speed and memory")
    print(report.to_markdown().split("\n\n", 1)[1].strip())
    if args.out:
        print(f"variants and report.md/json saved in {args.out}")
    return 0
