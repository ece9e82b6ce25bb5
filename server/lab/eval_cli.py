"""`nanoserve eval perplexity`: flags in, one result line (and optionally JSON) out."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from models.loader import load_model
from server.lab.perplexity import default_corpus, perplexity


def perplexity_to_stdout(args) -> int:
    try:
        path = Path(args.text) if args.text else default_corpus()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        print(f"nanoserve eval: error: cannot read the text: {error}", file=sys.stderr)
        return 2
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, overrides=args.override)
    try:
        result = perplexity(loaded, args.model, text, path.name, args.window, args.stride, args.max_tokens,
                            args.quantization, args.kv_cache_dtype)
    except ValueError as error:
        print(f"nanoserve eval: error: {error}", file=sys.stderr)
        return 2
    weights = f", {result.quantization} weights" if result.quantization else ""
    weights += ", int8 KV cache" if result.kv_cache_dtype == "int8" else ""
    print(f"{result.model} ({result.dtype}{weights}) on {result.corpus}: perplexity {result.perplexity:.3f}, "
          f"{result.bits_per_byte:.4f} bits/byte, {result.bits_per_token:.4f} bits/token over "
          f"{result.num_scored_tokens} tokens ({result.num_bytes} bytes; window {result.window}, "
          f"stride {result.stride}) in {result.elapsed_s:.1f}s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(asdict(result), indent=2))
    return 0
