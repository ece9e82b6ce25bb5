"""`nanoserve sweep` flags and YAML: the grid in, the run directory out.

A YAML file holds the same lists as the flags (models, overrides, dtypes, batch_sizes,
input_lens, output_lens); a flag given on the command line replaces the file's list.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.lab.sweep import GRID_KEYS, available_bytes, expand_grid, new_run_dir, run_sweep


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    from server.api.server_config import parse_bytes

    p.add_argument("--config", default=None, help="YAML file with the grid's lists (flags override it)")
    p.add_argument("--models", type=_names, default=None, help="comma-separated model specs, e.g. random:gpt2,random:gpt2-xl")
    p.add_argument("--overrides", action="append", default=None, metavar="KNOB=VALUE,...|none",
                   help="one knob set per flag (repeat for a knob study); none = the preset as is")
    p.add_argument("--dtypes", type=_names, default=None, help="e.g. float32,bfloat16 (default auto)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="e.g. 1,8,32 (default 1)")
    p.add_argument("--input-lens", type=_ints, default=None, help="prompt tokens, e.g. 128,512 (default 128)")
    p.add_argument("--output-lens", type=_ints, default=None, help="generated tokens (default 64)")
    p.add_argument("--out", default="runs", help="results go to <out>/<time>/")
    p.add_argument("--memory-limit", type=parse_bytes, default=None,
                   help="skip points estimated above this, e.g. 16GiB (default: MemAvailable)")
    p.add_argument("--wandb", action="store_true", help="log each point and a summary to Weights & Biases")
    p.add_argument("--wandb-project", default="nanoserve-sweeps")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the memory estimates only")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, not {text!r}") from None


def load_grid(args) -> dict:
    grid = {}
    if args.config:
        import yaml

        grid = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = set(grid) - set(GRID_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) in {args.config}: {', '.join(sorted(unknown))}; use {', '.join(GRID_KEYS)}")
    for key in GRID_KEYS:
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    return grid


def run(args) -> int:
    from server.lab.sweep import footprint
    from server.lab.sweep_report import COLUMNS, write_plots, write_results

    try:
        points = expand_grid(load_grid(args))
    except (OSError, ValueError) as error:
        print(f"nanoserve sweep: error: {error}", file=sys.stderr)
        return 2
    budget = args.memory_limit or available_bytes()
    if args.dry_run:
        for point in points:
            sizes = footprint(point)  # None for checkpoints
            print(f"{point.label}: weights {'?' if sizes is None else f'{sizes[0] / 2**30:.2f} GiB'}")
        return 0
    run_dir = new_run_dir(Path(args.out))
    logger = None
    if args.wandb:
        from server.lab.sweep_wandb import SweepLogger

        try:
            logger = SweepLogger(args.wandb_project, run_dir.name, run_dir)
        except RuntimeError as error:
            print(f"nanoserve sweep: error: {error}", file=sys.stderr)
            return 2
    print(f"sweep: {len(points)} points -> {run_dir} (memory budget {budget / 2**30:.1f} GiB)", file=sys.stderr)
    results = run_sweep(points, run_dir, budget, logger.log_point if logger else None)
    rows = write_results(results, run_dir)
    plots = write_plots(rows, run_dir)
    if logger:
        logger.log_summary(rows, COLUMNS, plots)
    _print_table(rows)
    print(f"results: {run_dir / 'results.csv'}, {run_dir / 'results.json'}; plots: {', '.join(p.name for p in plots)}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def _print_table(rows: list[dict]) -> None:
    print(f"{'point':<58} {'status':<8} {'out tok/s':>10} {'step ms':>8} {'TTFT ms':>8} {'RSS GiB':>8}")
    for r in rows:
        cells = [r.get(k) for k in ("output_tok_s", "decode_step_ms", "ttft_ms_median", "peak_rss_gib")]
        print(f"{r['label']:<58} {r['status']:<8} " + " ".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (10, 8, 8, 8))))
