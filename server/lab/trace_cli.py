"""`nanoserve trace`: flags in, the module tree (or JSON) out."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

from models.loader import load_model
from server.lab.trace import run_trace
from server.lab.trace_render import render_trace


def trace_to_stdout(args) -> int:
    """`nanoserve trace`: load, run, print the tree (or JSON)."""
    if args.decode_steps < 0 or args.block_size < 1:
        print("nanoserve trace: error: --decode-steps must be >= 0 and --block-size >= 1", file=sys.stderr)
        return 2
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, overrides=args.override)
    prompts = [loaded.tokenizer.encode(text) for text in args.prompt or ["The quick brown fox jumps over"]]
    if not all(prompts):
        print("nanoserve trace: error: a prompt encodes to no tokens", file=sys.stderr)
        return 2
    result = run_trace(loaded, args.model, prompts, args.decode_steps, args.block_size)
    if args.json:
        json.dump(asdict(result), sys.stdout, indent=1)
        print()
    else:
        render_trace(result, sys.stdout, args.all_layers)
    return 0
