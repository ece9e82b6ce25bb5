"""`nanoserve generate`: one prompt through the engine, text streamed to stdout, speed to stderr."""
from __future__ import annotations

import sys
import time

from models.loader import load_model
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams


def generate_to_stdout(args) -> int:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, overrides=args.override)
    engine = Engine(loaded, EngineConfig(max_num_seqs=1, kv_cache_memory=256 * 2**20))
    tokenizer = loaded.tokenizer
    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(text)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    engine.add_request("generate", prompt_ids, params)
    start, first_token_at, num_tokens = time.perf_counter(), None, 0
    while engine.has_unfinished():
        deltas, _ = engine.step()
        for delta in deltas:
            if first_token_at is None and delta.token_ids:
                first_token_at = time.perf_counter()
            num_tokens += len(delta.token_ids)
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    decode_rate = (num_tokens - 1) / (end - first_token_at) if num_tokens > 1 else 0.0
    print(f"[{len(prompt_ids)} prompt tokens, {num_tokens} generated in {end - start:.2f}s: "
          f"time to first token {((first_token_at or end) - start) * 1000:.0f} ms, "
          f"decode {decode_rate:.1f} tok/s]", file=sys.stderr)
    return 0
