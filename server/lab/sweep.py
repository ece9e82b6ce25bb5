"""`nanoserve sweep`: a grid of offline benchmarks, models x knobs x dtypes x batch x lengths.

Every point runs `nanoserve bench` in its own process (so its peak memory is its own and a
crash costs one point), with `--num-prompts` = `--max-num-seqs` = the batch size, so the decode
steps run at exactly that batch. Before a point starts, its memory is estimated (weights from a
meta-device build of the preset, KV pool for batch x (input + output) tokens, a fixed runtime
allowance) and a point that would not fit in the available memory is skipped with the numbers.
Results land in `runs/<time>/results.csv` + `results.json` + plots (server/lab/sweep_report.py)
and, with `--wandb`, in one wandb run per point plus a summary run (server/lab/sweep_wandb.py).
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUNTIME_ALLOWANCE = 1.5 * 2**30  # torch, tokenizer, activations and the bench's bandwidth probe (512 MiB)
GRID_KEYS = ("models", "overrides", "dtypes", "batch_sizes", "input_lens", "output_lens")


@dataclass
class SweepPoint:
    model: str
    overrides: str        # "" or "knob=value,..."
    dtype: str
    batch_size: int
    input_len: int
    output_len: int

    @property
    def label(self) -> str:
        knobs = f" [{self.overrides}]" if self.overrides else ""
        return f"{self.model}{knobs} {self.dtype} b{self.batch_size} in{self.input_len} out{self.output_len}"


@dataclass
class PointResult:
    point: SweepPoint
    status: str                      # ok | skipped | failed
    reason: str = ""
    estimate_gib: float | None = None
    metrics: dict = field(default_factory=dict)


def expand_grid(grid: dict) -> list[SweepPoint]:
    """Every combination, in the order the lists are given (models outermost)."""
    missing = [k for k in ("models",) if not grid.get(k)]
    if missing:
        raise ValueError("a sweep needs at least one model (--models or `models:` in the YAML)")
    lists = [grid.get(k) or default for k, default in zip(GRID_KEYS, ([], [""], ["auto"], [1], [128], [64]))]
    return [SweepPoint(m, "" if o in (None, "none") else str(o), d, int(b), int(i), int(n))
            for m, o, d, b, i, n in itertools.product(*lists)]


def footprint(point: SweepPoint) -> tuple[int, int] | None:
    """(weight bytes, KV bytes per token) of a random preset, from a meta-device build; None for
    checkpoints, whose size is only known once loaded. Raises ValueError for a bad preset or knob."""
    import torch

    from models.loader import resolve_dtype
    from models.overrides import parse_overrides
    from models.presets import preset_footprint

    if not point.model.startswith("random:"):
        return None
    num_params, kv_spec = preset_footprint(point.model.removeprefix("random:"), parse_overrides(point.overrides))
    dtype = resolve_dtype(point.dtype, torch.device("cpu"))
    return num_params * dtype.itemsize, kv_spec.bytes_per_block(1, dtype)


def batch_tokens(point: SweepPoint) -> int:
    """KV slots the whole batch holds at its longest (+ one block of slack per sequence)."""
    return point.batch_size * (point.input_len + point.output_len + 16)


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bench_command(point: SweepPoint, json_path: Path, kv_pool_bytes: int | None) -> list[str]:
    command = [sys.executable, "-m", "server.cli", "bench", "--model", point.model, "--dtype", point.dtype,
               "--num-prompts", str(point.batch_size), "--max-num-seqs", str(point.batch_size),
               "--input-len", str(point.input_len), "--output-len", str(point.output_len),
               "--max-num-batched-tokens", str(max(2048, point.input_len)), "--json", str(json_path)]
    if point.overrides:
        command += ["--override", point.overrides]
    if kv_pool_bytes is not None:  # a pool that holds the whole batch (the default 1 GiB may not)
        command += ["--kv-cache-memory", str(max(kv_pool_bytes, 16 * 2**20))]
    return command


def run_point(point: SweepPoint, index: int, run_dir: Path, budget: int) -> PointResult:
    try:
        sizes = footprint(point)
    except ValueError as error:  # an unknown preset or an inconsistent knob: refused before it starts
        return PointResult(point, "skipped", str(error))
    pool = None if sizes is None else sizes[1] * batch_tokens(point)
    estimate = None if sizes is None else int(sizes[0] + pool + RUNTIME_ALLOWANCE)
    gib = None if estimate is None else round(estimate / 2**30, 2)
    if estimate is not None and estimate > budget:
        return PointResult(point, "skipped", f"needs ~{gib} GiB (weights + KV for {point.batch_size} x "
                           f"{point.input_len + point.output_len} tokens + runtime), {budget / 2**30:.1f} GiB available",
                           gib)
    json_path, log_path = run_dir / "points" / f"{index:03d}.json", run_dir / "points" / f"{index:03d}.log"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        rc = subprocess.run(bench_command(point, json_path, pool), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not json_path.exists():
        tail = log_path.read_text().strip().splitlines()[-1:] or [f"exit code {rc}"]
        return PointResult(point, "failed", tail[0][-300:], gib)
    bench = json.loads(json_path.read_text())[0]
    return PointResult(point, "ok", "", gib, flatten_bench(bench))


def flatten_bench(bench: dict) -> dict:
    """The bench JSON's numbers a sweep compares, one flat dict."""
    extra = bench["extra"]
    keys = ("params_m", "weights_gib", "kv_bytes_per_token", "kv_cache_gib", "peak_rss_gib", "ttft_ms_median",
            "decode_batch", "decode_step_ms", "achieved_gflops", "peak_gflops", "roofline_fraction",
            "achieved_read_gbps", "measured_read_gbps", "memory_roofline_fraction")
    step_ms = extra.get("decode_step_ms")
    decode_tok_s = round(1000 * extra["decode_batch"] / step_ms, 2) if step_ms else None  # batch / median step
    return {"output_tok_s": round(bench["output_tokens_per_s"], 2), "decode_tok_s": decode_tok_s,
            "total_tok_s": round(bench["total_tokens_per_s"], 2), "elapsed_s": round(bench["elapsed_s"], 2),
            **{k: extra.get(k) for k in keys}}


def run_sweep(points: list[SweepPoint], run_dir: Path, memory_budget: int, on_result=None) -> list[PointResult]:
    """Run every point in order with a progress bar; on_result(result) after each."""
    from tqdm import tqdm

    results = []
    with tqdm(points, desc="sweep", unit="point", file=sys.stderr) as bar:
        for index, point in enumerate(bar):
            bar.set_postfix_str(point.label)
            result = run_point(point, index, run_dir, memory_budget)
            if result.status != "ok":
                tqdm.write(f"{result.status}: {point.label}: {result.reason}", file=sys.stderr)
            results.append(result)
            if on_result:
                on_result(result)
    return results


def new_run_dir(root: Path) -> Path:
    path = root / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while path.exists():
        path, suffix = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}", suffix + 1
    path.mkdir(parents=True)
    return path


def result_row(result: PointResult) -> dict:
    return {**asdict(result.point), "label": result.point.label, "status": result.status, "reason": result.reason,
            "estimate_gib": result.estimate_gib, **result.metrics}
