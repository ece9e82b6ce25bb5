"""A sweep's results on disk: results.csv, results.json and four plots.

    throughput.png   output tok/s vs batch size, one line per model/knobs/dtype/lengths: end to end
                     (prefill included) and decode only (batch / median decode step)
    ttft.png         median time to first token vs prompt length (the whole batch prefills at once)
    memory.png       peak RSS and weight GiB vs parameter count
    roofline.png     compute and memory roofline fraction of the median decode step, per point
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from server.lab.sweep import PointResult, result_row

COLUMNS = ["label", "model", "overrides", "dtype", "batch_size", "input_len", "output_len", "status", "reason",
           "estimate_gib", "params_m", "weights_gib", "kv_bytes_per_token", "kv_cache_gib", "peak_rss_gib",
           "output_tok_s", "decode_tok_s", "total_tok_s", "elapsed_s", "ttft_ms_median", "decode_batch", "decode_step_ms",
           "achieved_gflops", "peak_gflops", "roofline_fraction", "achieved_read_gbps", "measured_read_gbps",
           "memory_roofline_fraction"]
PLOTS = ("throughput.png", "ttft.png", "memory.png", "roofline.png")


def write_results(results: list[PointResult], run_dir: Path) -> list[dict]:
    rows = [result_row(r) for r in results]
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def write_plots(rows: list[dict], run_dir: Path) -> list[Path]:
    """The four plots over the points that ran; [] when none did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    paths = []
    for name, draw in zip(PLOTS, (_throughput, _ttft, _memory, _roofline)):
        wide = draw is _throughput
        fig, axes = plt.subplots(1, 2 if wide else 1, figsize=(12 if wide else 7, 4.5), squeeze=False)
        draw(*axes[0], ok)
        for ax in axes[0]:
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        paths.append(run_dir / name)
    return paths


def _series(rows: list[dict], x: str, fixed: tuple[str, ...]) -> dict[str, list[dict]]:
    """Rows grouped by everything in `fixed`, each group sorted by x."""
    groups = defaultdict(list)
    for row in rows:
        knobs = f" [{row['overrides']}]" if row["overrides"] else ""
        key = f"{row['model']}{knobs} {row['dtype']} " + " ".join(f"{k.split('_')[0]}{row[k]}" for k in fixed)
        groups[key.strip()].append(row)
    return {k: sorted(v, key=lambda r: r[x]) for k, v in groups.items()}


def _throughput(end_to_end, decode, rows: list[dict]) -> None:
    for label, series in _series(rows, "batch_size", ("input_len", "output_len")).items():
        batches = [r["batch_size"] for r in series]
        end_to_end.plot(batches, [r["output_tok_s"] for r in series], marker="o", label=label)
        decode.plot(batches, [r["decode_tok_s"] for r in series], marker="o", label=label)
    end_to_end.set(xscale="log", xlabel="batch size (sequences together)", ylabel="output tokens/s",
                   title="End to end (prefill included)")
    decode.set(xscale="log", xlabel="batch size (sequences decoding together)", ylabel="tokens/s",
               title="Decode only: batch / median decode step")


def _ttft(ax, rows: list[dict]) -> None:
    for label, series in _series(rows, "input_len", ("batch_size",)).items():
        ax.plot([r["input_len"] for r in series], [r["ttft_ms_median"] for r in series], marker="o", label=label)
    ax.set(xlabel="prompt length (tokens)", ylabel="median time to first token (ms)",
           title="TTFT vs prompt length (whole batch queued at once)")


def _memory(ax, rows: list[dict]) -> None:
    by_model = {}
    for row in rows:
        by_model.setdefault((row["params_m"], row["model"], row["overrides"], row["dtype"]), []).append(row)
    points = sorted(by_model.items())
    xs = [k[0] for k, _ in points]
    ax.plot(xs, [max(r["peak_rss_gib"] for r in v) for _, v in points], marker="o", label="peak RSS (largest batch)")
    ax.plot(xs, [v[0]["weights_gib"] for _, v in points], marker="s", label="weights")
    for (params, model, overrides, dtype), _ in points:
        ax.annotate(f"{model.removeprefix('random:')} {dtype}", (params, by_model[(params, model, overrides, dtype)][0]["weights_gib"]),
                    fontsize=6, textcoords="offset points", xytext=(3, -8))
    ax.set(xscale="log", xlabel="parameters (millions)", ylabel="GiB", title="Memory vs model size")


def _roofline(ax, rows: list[dict]) -> None:
    labels = [r["label"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["roofline_fraction"] or 0 for r in rows], width=0.4, label="compute (GEMM peak)")
    ax.bar([x + 0.2 for x in xs], [r["memory_roofline_fraction"] or 0 for r in rows], width=0.4, label="memory (read bandwidth)")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=6)
    ax.set(ylabel="fraction of the roofline", title="Median decode step vs its floors (1.0 = at the floor)")
