"""Sweep results: per-level statistics from the request samples, summary.json, and the PNG plots.

A level's window runs from its first request's send to its last request's end; rates divide by
it. Percentiles are over successful requests (numpy's linear interpolation), in milliseconds.
The server's own counter delta is stored next to the client's count so the two can be compared.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from loadtest.client import RequestRecord


@dataclass
class LevelSummary:
    users: int
    duration_s: float
    num_requests: int
    num_errors: int
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens_per_s: float
    mean_output_tokens: float
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    ttft_ms_p99: float | None
    itl_ms_p50: float | None
    itl_ms_p99: float | None
    e2e_ms_p50: float | None
    e2e_ms_p99: float | None
    server_generation_tokens: float | None = None      # nanoserve_generation_tokens_total delta
    server_output_tokens_per_s: float | None = None
    errors: dict[str, int] | None = None               # reason -> count (first 80 characters)
    # time per output token of a request after its first, (e2e - ttft) / (tokens - 1): unlike
    # the chunk gaps (ITL) it stays per token when a chunk carries several (speculation)
    tpot_ms_p50: float | None = None
    tpot_ms_p99: float | None = None
    server_spec_acceptance: float | None = None         # accepted / verified draft tokens, when speculating


def load_samples(path: Path) -> list[RequestRecord]:
    if not path.exists():
        return []
    return [RequestRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 3) if values else None


def _error_counts(records: list[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if r.error:
            counts[r.error[:80]] = counts.get(r.error[:80], 0) + 1
    return counts


def summarize_level(users: int, records: list[RequestRecord], server_tokens: float | None = None) -> LevelSummary:
    """Rates and latency percentiles of one concurrency level."""
    ok = [r for r in records if r.error is None]
    window = max((r.start + r.e2e for r in records), default=0.0) - min((r.start for r in records), default=0.0)
    window = max(window, 1e-9)
    output_tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itl]
    e2es = [r.e2e for r in ok]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return LevelSummary(
        users=users, duration_s=round(window, 3), num_requests=len(records), num_errors=len(records) - len(ok),
        requests_per_s=round(len(ok) / window, 3), output_tokens=output_tokens,
        output_tokens_per_s=round(output_tokens / window, 2),
        prompt_tokens_per_s=round(sum(r.prompt_tokens for r in ok) / window, 2),
        mean_output_tokens=round(output_tokens / len(ok), 2) if ok else 0.0,
        ttft_ms_p50=_pct(ttfts, 50), ttft_ms_p90=_pct(ttfts, 90), ttft_ms_p99=_pct(ttfts, 99),
        itl_ms_p50=_pct(itls, 50), itl_ms_p99=_pct(itls, 99),
        e2e_ms_p50=_pct(e2es, 50), e2e_ms_p99=_pct(e2es, 99),
        server_generation_tokens=server_tokens,
        server_output_tokens_per_s=None if server_tokens is None else round(server_tokens / window, 2),
        errors=_error_counts(records) or None,
        tpot_ms_p50=_pct(tpots, 50), tpot_ms_p99=_pct(tpots, 99),
    )


def write_summary(run_dir: Path, meta: dict, levels: list[LevelSummary]) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps({"meta": meta, "levels": [asdict(s) for s in levels]}, indent=2) + "\n")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")               # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(levels: list[LevelSummary], path: Path, title: str) -> None:
    """Output tokens/s and requests/s vs users, stacked on one concurrency axis."""
    plt = _pyplot()
    users = [s.users for s in levels]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(users, [s.output_tokens_per_s for s in levels], "o-", label="client (usage counts)")
    server = [s.server_output_tokens_per_s for s in levels]
    if any(v is not None for v in server):
        top.plot(users, [np.nan if v is None else v for v in server], "x--", label="server counter")
    top.set_ylabel("output tokens/s")
    top.legend()
    bottom.plot(users, [s.requests_per_s for s in levels], "s-", color="tab:orange")
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel("concurrent users")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(users, [str(u) for u in users])
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    top.set_title(f"Throughput vs concurrency\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(levels: list[LevelSummary], path: Path, title: str) -> None:
    plt = _pyplot()
    users = [s.users for s in levels]
    panels = [("time to first token", ["ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99"]),
              ("inter-token gap", ["itl_ms_p50", "itl_ms_p99"]),
              ("end-to-end", ["e2e_ms_p50", "e2e_ms_p99"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            values = [getattr(s, key) for s in levels]
            ax.plot(users, [np.nan if v is None else v for v in values], "o-", label=key.rsplit("_", 1)[1])
        ax.set_xscale("log", base=2)
        ax.set_xticks(users, [str(u) for u in users])
        ax.set_xlabel("concurrent users")
        ax.set_ylabel("ms")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Latency percentiles vs concurrency — {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ttft_distribution(ttfts_by_users: dict[int, list[float]], path: Path, title: str) -> None:
    """Empirical CDF of TTFT (ms), one line per level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for users, ttfts in sorted(ttfts_by_users.items()):
        if ttfts:
            xs = np.sort(np.asarray(ttfts) * 1000)
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=f"{users} users (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT distribution\n{title}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run_dir: Path, levels: list[LevelSummary], ttfts_by_users: dict[int, list[float]], title: str) -> list[Path]:
    paths = [run_dir / "throughput.png", run_dir / "latency.png", run_dir / "ttft_distribution.png"]
    plot_throughput(levels, paths[0], title)
    plot_latency(levels, paths[1], title)
    plot_ttft_distribution(ttfts_by_users, paths[2], title)
    return paths
