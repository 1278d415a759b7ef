"""Run every benchmark (or those named) and write a markdown report of the figures.

    python -m benchmarks.run                 # all, default sizes
    python -m benchmarks.run tabular --quick # one benchmark, small sizes
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

from benchmarks.common import Figure

#: name -> module; each module has ``run(data_dir: Path, quick: bool) -> list[Figure]``.
BENCHMARKS = {
    "tabular": "benchmarks.bench_tabular_sync",
    "latency": "benchmarks.bench_latency",
    "images": "benchmarks.bench_images",
    "text": "benchmarks.bench_text",
    "precision": "benchmarks.bench_precision",
    "startup": "benchmarks.bench_startup",
    "graph": "benchmarks.bench_graph",
    "query": "benchmarks.bench_query",
    "trigger": "benchmarks.bench_trigger",
    "ui": "benchmarks.bench_ui",
    "filtered": "benchmarks.bench_filtered",
    "hybrid": "benchmarks.bench_hybrid",
    "storage": "benchmarks.bench_storage",
    "gpu": "benchmarks.bench_gpu",
    "workers": "benchmarks.bench_workers",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/report.md"), help="markdown report")
    parser.add_argument("--data-dir", type=Path, default=Path("benchmarks/results/pg"), help="embedded database")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    figures: list[Figure] = []
    failures: list[str] = []
    for name in args.names or list(BENCHMARKS):
        try:
            module = importlib.import_module(BENCHMARKS[name])
        except ModuleNotFoundError as exc:
            print(f"[{name}] skipped: {exc}", file=sys.stderr)
            continue
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            produced = module.run(args.data_dir.resolve(), args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"[{name}] failed: {exc}", file=sys.stderr)
            continue
        for figure in produced:
            print(figure.line(), flush=True)
        figures.extend(produced)
        print(f"[{name}] done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    lines = [
        "# vectorsync benchmark report",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} · {platform.machine()} · {platform.python_version()} · "
        f"{'quick' if args.quick else 'full'} sizes",
        "",
        "| benchmark | figure | value | baseline (same run) | ratio | target |",
        "|---|---|---|---|---|---|",
        *[f.line() for f in figures],
    ]
    if failures:
        lines += ["", "Failed:", *[f"- {f}" for f in failures]]
    from vectorsync.sync import embedded

    embedded.stop(args.data_dir.resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"report written to {args.out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
