"""Concurrency sweep: headless Locust at each level, one folder per run with CSVs, summary.json and plots.

    python -m loadtest --host http://127.0.0.1:8000 --levels 1,4,16 --duration 30
    nanoserve loadtest --model random:tiny-qwen2 --levels 1,2 --duration 5   # starts the server too

Each level is one `locust --headless -u N -r N` subprocess, bounded by `--duration` seconds (users
then finish the request they are in, for up to `--stop-timeout`) and optionally `--requests`.
Around each level the server's `nanoserve_generation_tokens_total` is read from /metrics, so the
summary holds the server's own token count next to the client's.

    runs/<time>-<scenario>/
        level_004/locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv,
                  samples.jsonl (one request per line), locust.log
        summary.json  throughput.png  latency.png  ttft_distribution.png
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest import report
from loadtest.launcher import ServerProcess
from loadtest.scenarios import SCENARIOS

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
GENERATION_COUNTER = "nanoserve_generation_tokens_total"
DRAFT_TOKENS_COUNTER = "nanoserve_spec_decode_num_draft_tokens_total"
ACCEPTED_TOKENS_COUNTER = "nanoserve_spec_decode_num_accepted_tokens_total"
SERVER_COUNTERS = (GENERATION_COUNTER, DRAFT_TOKENS_COUNTER, ACCEPTED_TOKENS_COUNTER)


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """Every sweep flag (shared by `python -m loadtest` and `nanoserve loadtest`)."""
    target = p.add_mutually_exclusive_group()
    target.add_argument("--host", default="http://127.0.0.1:8000", help="server URL to load")
    target.add_argument("--model", default=None, help="start `nanoserve serve --model SPEC` on a free loopback port and stop it after")
    p.add_argument("--server-args", default="", help="extra serve flags when --model is given, e.g. '--max-num-seqs 64'")
    p.add_argument("--levels", default="1,2,4,8,16,32", help="comma-separated concurrent users per level")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per level")
    p.add_argument("--requests", type=int, default=0, help="also stop a level after this many requests (0: duration only)")
    p.add_argument("--stop-timeout", type=float, default=120.0, help="seconds users get to finish their last request")
    p.add_argument("--scenario", default="short_chat", choices=[*SCENARIOS, "mixed"])
    p.add_argument("--api", default="chat", choices=["chat", "completions"])
    p.add_argument("--stream-fraction", type=float, default=1.0, help="share of streamed requests (TTFT/ITL need streaming)")
    p.add_argument("--ignore-eos", action="store_true", help="fixed output lengths: every answer runs to max_tokens")
    p.add_argument("--prompt-tokens", type=int, default=0, help="mean prompt length (0: the scenario's)")
    p.add_argument("--output-tokens", type=int, default=0, help="mean max_tokens (0: the scenario's)")
    p.add_argument("--range-ratio", type=float, default=-1.0, help="lengths uniform in mean*[1-r, 1+r]; 0 = fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs", help="parent folder of the run folder")
    p.add_argument("--name", default=None, help="run folder name (default: <time>-<scenario>)")
    p.add_argument("--wandb", action="store_true", help="log each level and the plots to Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--wandb-project", default="nanoserve-loadtest")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines instead of a progress bar")


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--levels needs positive integers, got {text!r}")
    return levels


def read_counters(url: str) -> dict[str, float] | None:
    """The server counters a level reports, each summed over its labels: generated tokens, and
    speculative draft/accepted tokens. None, with a warning, when /metrics has no nanoserve
    generation counter: unreachable, an error status (llama-server without `--metrics` answers
    501 with a JSON error), text that is not Prometheus', or another server's metrics."""
    try:
        response = httpx.get(url + "/metrics", timeout=10)
        response.raise_for_status()
        totals = dict.fromkeys(SERVER_COUNTERS, 0.0)
        seen = set()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
                    seen.add(sample.name)
    except (httpx.HTTPError, ValueError) as error:
        print(f"warning: no server counters from {url}/metrics: {str(error).splitlines()[0][:200]}", file=sys.stderr)
        return None
    if GENERATION_COUNTER not in seen:
        print(f"warning: {url}/metrics has no {GENERATION_COUNTER}: not a nanoserve server", file=sys.stderr)
        return None
    return totals


def locust_command(args: argparse.Namespace, url: str, users: int, level_dir: Path) -> list[str]:
    user_class = "ChatUser" if args.api == "chat" else "CompletionUser"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "-u", str(users), "-r", str(users), "-t", f"{max(1, round(args.duration))}s",
               "--stop-timeout", str(max(1, round(args.stop_timeout))), "--csv", str(level_dir / "locust"),
               "--host", url, "--loglevel", "WARNING", "--exit-code-on-error", "0",
               "--scenario", args.scenario, "--stream-fraction", str(args.stream_fraction),
               "--prompt-tokens", str(args.prompt_tokens), "--output-tokens", str(args.output_tokens),
               "--range-ratio", str(args.range_ratio), "--seed", str(args.seed),
               "--max-requests", str(args.requests), "--samples-file", str(level_dir / "samples.jsonl")]
    return command + (["--ignore-eos"] if args.ignore_eos else []) + [user_class]


def run_level(args: argparse.Namespace, url: str, users: int, run_dir: Path, progress) -> report.LevelSummary:
    """One headless Locust run at `users` concurrency; returns its summary."""
    level_dir = run_dir / f"level_{users:03d}"
    level_dir.mkdir(parents=True, exist_ok=True)
    samples_path = level_dir / "samples.jsonl"
    before = read_counters(url)
    with open(level_dir / "locust.log", "wb") as log:
        proc = subprocess.Popen(locust_command(args, url, users, level_dir), stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while proc.poll() is None:
            progress.update(users, time.monotonic() - started, _count_lines(samples_path))
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"locust exited with {proc.returncode} at {users} users; see {level_dir / 'locust.log'}")
    after = read_counters(url)
    moved = None if before is None or after is None else {name: after[name] - before[name] for name in after}
    summary = report.summarize_level(users, report.load_samples(samples_path),
                                     None if moved is None else moved[GENERATION_COUNTER])
    if moved and moved[DRAFT_TOKENS_COUNTER]:
        summary.server_spec_acceptance = round(moved[ACCEPTED_TOKENS_COUNTER] / moved[DRAFT_TOKENS_COUNTER], 4)
    return summary


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


class Progress:
    """A rich progress bar over the whole sweep's load time (or plain lines with --no-progress)."""

    def __init__(self, levels: list[int], duration_s: float, enabled: bool) -> None:
        self.enabled = enabled
        self.duration_s = duration_s
        self.done_s = 0.0
        if enabled:
            from rich.progress import BarColumn, Progress as RichProgress, TimeElapsedColumn

            self.bar = RichProgress("[progress.description]{task.description}", BarColumn(), TimeElapsedColumn())
            self.task = self.bar.add_task("sweep", total=len(levels) * duration_s)

    def __enter__(self) -> "Progress":
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()

    def update(self, users: int, elapsed_s: float, num_requests: int) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=self.done_s + min(elapsed_s, self.duration_s),
                            description=f"{users:>3} users: {num_requests} requests")

    def level_done(self, summary: report.LevelSummary) -> None:
        self.done_s += self.duration_s
        line = (f"{summary.users:>3} users: {summary.requests_per_s:.2f} req/s, {summary.output_tokens_per_s:.1f} output tok/s, "
                f"TTFT p50 {summary.ttft_ms_p50} ms p99 {summary.ttft_ms_p99} ms, {summary.num_errors} errors")
        (self.bar.console.print if self.enabled else print)(line)


def run_sweep(args: argparse.Namespace, url: str, run_dir: Path) -> list[report.LevelSummary]:
    levels = parse_levels(args.levels)
    summaries: list[report.LevelSummary] = []
    with Progress(levels, args.duration, args.progress) as progress:
        for users in levels:
            summaries.append(run_level(args, url, users, run_dir, progress))
            progress.level_done(summaries[-1])
    return summaries


def _meta(args: argparse.Namespace, url: str) -> dict:
    keys = ("model", "server_args", "levels", "duration", "requests", "scenario", "api", "stream_fraction",
            "ignore_eos", "prompt_tokens", "output_tokens", "range_ratio", "seed")
    meta = {k: getattr(args, k) for k in keys} | {"levels": parse_levels(args.levels)}
    try:
        meta["served_model"] = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        meta["served_model"] = None
    return {**meta, "url": url, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def log_to_wandb(args: argparse.Namespace, meta: dict, summaries: list[report.LevelSummary], plots: list[Path]) -> None:
    """Imported only with --wandb: one step per level, then the plots as images."""
    import wandb

    run = wandb.init(project=args.wandb_project, config=meta, job_type="loadtest")
    for step, summary in enumerate(summaries):
        run.log({k: v for k, v in asdict(summary).items() if isinstance(v, (int, float))}, step=step)
    run.log({path.stem: wandb.Image(str(path)) for path in plots})
    run.finish()


def sweep(args: argparse.Namespace, url: str) -> Path:
    """Run every level against `url` and write the run folder; returns its path."""
    name = args.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.scenario}"
    run_dir = Path(args.out) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = _meta(args, url)
    summaries = run_sweep(args, url, run_dir)
    report.write_summary(run_dir, meta, summaries)
    ttfts = {s.users: [r.ttft for r in report.load_samples(run_dir / f"level_{s.users:03d}" / "samples.jsonl")
                       if r.error is None and r.ttft is not None] for s in summaries}
    title = f"{meta['served_model'] or url} · {args.scenario} · {args.api}"
    plots = report.write_plots(run_dir, summaries, ttfts, title)
    if args.wandb:
        log_to_wandb(args, meta, summaries, plots)
    print(f"wrote {run_dir}")
    return run_dir


def run(args: argparse.Namespace) -> int:
    """Sweep `--host`, or a server started for `--model` (its log goes to the run's parent folder)."""
    if not args.model:
        sweep(args, args.host.rstrip("/"))
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ServerProcess(args.model, args.server_args, log_path=Path(args.out) / "server.log") as server:
        sweep(args, server.url)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    add_sweep_arguments(parser)
    return run(parser.parse_args(argv))
