"""The table scripts/gpu_check.sh prints after its bench runs, from their `nanoserve bench --json` files.

    python scripts/gpu_summary.py BENCH_DIR [SUMMARY.md]

Each file is named MODEL__nN__MODE.json (MODE: eager or graphs) and holds nanoserve's result
first, then HF generate's when that run had `--baseline hf`. One row per file: output tok/s, the
median decode step at its most frequent batch, the bytes that step must read (weights + the K/V
it attends to), that over the step time as a fraction of the read bandwidth measured on the spot
(the memory roofline), HF generate's best static batch on the same prompts and the ratio. Graph
rows borrow HF's numbers from the eager run of the same model and prompt count. Per model, the
last lines set the batch-1 runs against the issue's target of half the memory roofline, and the
largest run against the best HF batch seen (its 5x target).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("model", "seqs", "mode", "tok/s", "decode batch", "step ms", "step MB", "achieved GB/s",
           "measured GB/s", "mem roofline", "HF tok/s (batch)", "x HF")


def load_runs(folder: Path) -> list[dict]:
    """One dict per JSON file: model, n, mode, nanoserve's result and HF's (or None)."""
    runs = []
    for path in sorted(folder.glob("*.json")):
        model, n, mode = path.stem.split("__")
        results = json.loads(path.read_text())
        hf = next((r for r in results[1:] if r["name"].startswith("hf generate")), None)
        runs.append(dict(model=model.replace("_", ":", 1), n=int(n.removeprefix("n")), mode=mode,
                         engine=results[0], hf=hf))
    return sorted(runs, key=lambda r: (r["model"], r["n"], r["mode"] != "eager"))


def hf_label(hf: dict | None) -> str:
    if hf is None:
        return "-"
    return f"{hf['output_tokens_per_s']:.0f} ({hf['name'].removeprefix('hf generate (').rstrip(')')})"


def row(run: dict, hf: dict | None) -> list[str]:
    e = run["engine"]
    x = e["extra"]
    ratio = f"{e['output_tokens_per_s'] / hf['output_tokens_per_s']:.2f}" if hf else "-"
    return [run["model"], str(run["n"]), run["mode"], f"{e['output_tokens_per_s']:.0f}",
            str(x.get("decode_batch", "-")), str(x.get("decode_step_ms", "-")), str(x.get("step_read_mb", "-")),
            str(x.get("achieved_read_gbps", "-")), str(x.get("measured_read_gbps", "-")),
            str(x.get("memory_roofline_fraction", "-")), hf_label(hf), ratio]


def best_hf(runs: list[dict]) -> tuple[float, str] | None:
    """HF generate's best tok/s over every static batch of every run, and which batch gave it."""
    best = None
    for run in runs:
        for batch, tok_s in (run["hf"] or {}).get("extra", {}).get("output_tok_s_by_batch_size", {}).items():
            if best is None or tok_s > best[0]:
                best = (tok_s, f"batch {batch} of {run['n']} prompts")
    return best


def summarize(runs: list[dict]) -> str:
    eager_hf = {(r["model"], r["n"]): r["hf"] for r in runs if r["hf"] is not None}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r, eager_hf.get((r["model"], r["n"])))) + " |" for r in runs]
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        best, largest = best_hf(mine), max(mine, key=lambda r: (r["n"], r["engine"]["output_tokens_per_s"]))
        lines.append("")
        for single in (r for r in mine if r["n"] == 1):
            fraction = single["engine"]["extra"].get("memory_roofline_fraction", "-")
            lines.append(f"{model}: batch-1 decode ({single['mode']}) at {fraction} of the memory roofline; "
                         "target 0.5 with CUDA graphs")
        if best:
            ratio = largest["engine"]["output_tokens_per_s"] / best[0]
            lines.append(f"{model}: nanoserve at {largest['n']} sequences ({largest['mode']}) = {ratio:.2f}x "
                         f"HF generate's best ({best[0]:.0f} tok/s, {best[1]}); target 5x")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    runs = load_runs(Path(argv[0]))
    if not runs:
        print(f"no bench results in {argv[0]}")
        return 1
    text = summarize(runs)
    print(text, end="")
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
