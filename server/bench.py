"""`nanoserve bench`: offline throughput, vLLM `bench throughput` style, in hardware terms.

All prompts are queued at once and the engine runs them to completion (fixed output length,
ignore_eos). Besides requests/s and tokens/s it times every step, and for the pure decode steps
compares the achieved matmul GFLOP/s with a GEMM peak measured on the spot (gpt-fast style):
"roofline" is the time the step's matrix multiplies alone would take at that peak divided by
the step's real time. A decode step also has to read every weight and every cached key and
value once, so it reports the memory side too: the bytes a step must read, the read bandwidth
measured on the spot (a large float32 sum), and the "memory roofline" (the time those bytes take
at that bandwidth divided by the step's real time). Whichever floor is higher bounds the step.
Medians of per-step times, never one total, because shared machines drift.
"""
from __future__ import annotations

import json
import random
import resource
import statistics
import sys
import time
from dataclasses import asdict

import torch

from models.kv_int8 import pool_dtype
from models.loader import LoadedModel, load_model
from server.api.server_config import speculative_config_from_args
from server.bench_baselines import run_hf_generate, run_naive, to_transformers
from server.bench_results import BenchResult
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling_params import GrammarSpec, SamplingParams


# `--structured-output json`: every request must write this (at least 100 objects, so no request
# can finish before --output-len; JSON structure, strings and integers all take part in the mask).
BENCH_JSON_SCHEMA = GrammarSpec("json_schema", json.dumps({
    "type": "array", "minItems": 100, "items": {
        "type": "object", "required": ["id", "name", "tags"], "additionalProperties": False,
        "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
                       "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}}))


def make_prompts(num: int, input_len: int, vocab_size: int, shared_prefix: bool, seed: int = 0) -> list[list[int]]:
    """Random token prompts; with shared_prefix the first half of every prompt is the same."""
    rng = random.Random(seed)
    high = min(vocab_size, 50000)
    prefix = [rng.randrange(high) for _ in range(input_len // 2)] if shared_prefix else []
    return [prefix + [rng.randrange(high) for _ in range(input_len - len(prefix))] for _ in range(num)]


def gemm_peak_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n x n matmul in the run dtype."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_dtype(loaded: LoadedModel) -> torch.dtype:
    """The dtype whose matmul peak bounds this run: the model's, except bf16 on a CPU where oneDNN
    has no bf16 path, whose linears (models/csrc/bf16_avx2_linear.cpp) multiply in float32 FMAs
    (ATen's bf16 matmul there is ~3x slower than float32, so it would state a peak below the
    kernel's own rate)."""
    from models.fast_linear import onednn_packs_bf16

    if loaded.device.type == "cpu" and loaded.dtype == torch.bfloat16 and not onednn_packs_bf16():
        return torch.float32
    return loaded.dtype


def read_bandwidth_gbps(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best-of-`repeats` GB/s of summing a float32 tensor far larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def matmul_params_per_token(model: torch.nn.Module) -> int:
    """Weights every decoded token multiplies by: all Linear layers incl. the LM head, plus the
    top-k routed experts of each MoE layer (not all E of them)."""
    from models.moe import moe_layers

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # packed or quantized alike
    experts = sum(layer.gate.config.top_k * (layer.experts.gate_up_proj[0].numel() + layer.experts.down_proj[0].numel())
                  for layer in moe_layers(model))
    return sum(m.in_features * m.out_features for m in linears) + experts


def matmul_bytes_per_token(model: torch.nn.Module, tensor_parallel_size: int = 1) -> int:
    """Bytes of those weights as the engine stores them (call after it built: packed, quantized,
    sharded), all ranks together: float linears at their dtype, quantized ones at their values
    and scales, the top-k routed experts of each MoE layer."""
    from models.moe import moe_layers
    from models.quantized_linear import QuantizedLinear

    linears = 0  # one rank's share
    for m in model.modules():
        kernel = getattr(m, "kernel", None)
        if isinstance(kernel, QuantizedLinear):
            linears += sum(p.numel() * p.element_size() for name, p in kernel.named_parameters() if name != "bias")
        elif isinstance(m, torch.nn.Linear):
            weight = m.weight if kernel is None else kernel.packed_weight  # PackedLinear
            linears += m.in_features * m.out_features * weight.dtype.itemsize
    experts = 0  # the top-k experts a token visits, wherever they live
    for layer in moe_layers(model):
        e = layer.experts
        experts += layer.gate.config.top_k * (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * e.gate_up_proj.dtype.itemsize
    return linears * tensor_parallel_size + experts


def run_engine(loaded: LoadedModel, prompts: list[list[int]], output_len: int, config: EngineConfig,
               grammar: GrammarSpec | None = None) -> BenchResult:
    engine = Engine(loaded, config)
    try:
        if loaded.device.type == "cuda":  # compile the Triton kernels (and warm cuBLAS) outside the timed run
            warmup = [p[:16][::-1] for p in prompts[:2]]  # reversed: no block of it is a prompt's prefix
            engine.generate(warmup, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        return _drive(engine, loaded, prompts, output_len, config, grammar)
    finally:
        engine.close()  # tensor-parallel workers, if any


def _drive(engine: Engine, loaded: LoadedModel, prompts: list[list[int]], output_len: int, config: EngineConfig,
           grammar: GrammarSpec | None) -> BenchResult:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, grammar=grammar)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    decode_steps: dict[int, list[float]] = {}
    decode_contexts: dict[int, list[int]] = {}  # tokens of context the step's sequences attend to
    start, num_out, drafted, accepted, ttfts = time.perf_counter(), 0, 0, 0, []
    while engine.has_unfinished():
        context = sum(seq.num_computed_tokens + 1 for seq in engine.scheduler.running)
        step_start = time.perf_counter()
        _, stats = engine.step()
        _sync(loaded.device)
        num_out += stats.num_generation_tokens
        ttfts += stats.time_to_first_tokens
        drafted, accepted = drafted + stats.num_spec_draft_tokens, accepted + stats.num_spec_accepted_tokens
        if stats.batch_size and stats.num_batched_tokens == stats.batch_size:  # decode only
            decode_steps.setdefault(stats.batch_size, []).append(time.perf_counter() - step_start)
            decode_contexts.setdefault(stats.batch_size, []).append(context)
    elapsed = time.perf_counter() - start
    assert num_out == len(prompts) * output_len, f"generated {num_out} tokens, expected {len(prompts) * output_len}"
    num_in = sum(len(p) for p in prompts)
    kv_bytes = sum(pool.numel() * pool.element_size() for pools in engine.runner.kv_caches for pool in pools)
    extra = {"kv_cache_gib": round(kv_bytes / 2**30, 2),
             "decode_step_ms_median": {b: round(1000 * statistics.median(t), 2) for b, t in sorted(decode_steps.items())},
             "decode_step_counts": {b: len(t) for b, t in sorted(decode_steps.items())},
             "decode_context_tokens_median": {b: int(statistics.median(c)) for b, c in sorted(decode_contexts.items())},
             "ttft_ms_median": round(1000 * statistics.median(ttfts), 1),  # queued at once: batch prefill
             "preemptions": engine.scheduler.num_preemptions,
             "prefix_hit_tokens": engine.block_manager.num_prefix_hit_tokens}
    if config.speculative is not None:
        extra["spec_draft_tokens"], extra["spec_accepted_tokens"] = drafted, accepted
    name = "nanoserve" if grammar is None else "nanoserve + JSON schema"
    return BenchResult(name, len(prompts), len(prompts[0]), output_len, elapsed,
                       len(prompts) / elapsed, num_out / elapsed, (num_in + num_out) / elapsed, extra)


def run_structured_pairs(loaded: LoadedModel, prompts: list[list[int]], output_len: int, config: EngineConfig,
                         num_pairs: int = 3) -> BenchResult:
    """Free and JSON-constrained runs, alternated `num_pairs` times so that a busy neighbour
    lands on both sides; reports the last constrained run plus the median over pairs of the
    constrained / free ratio of median decode steps (the mask's cost per step)."""
    ratios, constrained = [], None
    for _ in range(num_pairs):
        free = run_engine(loaded, prompts, output_len, config)
        constrained = run_engine(loaded, prompts, output_len, config, BENCH_JSON_SCHEMA)
        ratios.append(_main_step_ms(constrained) / _main_step_ms(free))
    constrained.extra["decode_step_ratio_vs_free"] = [round(r, 3) for r in ratios]
    constrained.extra["decode_step_ratio_vs_free_median"] = round(statistics.median(ratios), 3)
    return constrained


def _main_step_ms(result: BenchResult) -> float:
    """Median step time at the most frequent decode batch size."""
    counts = result.extra["decode_step_counts"]
    return result.extra["decode_step_ms_median"][max(counts, key=lambda b: (counts[b], b))]


def roofline(loaded: LoadedModel, result: BenchResult, peak_gflops: float, read_gbps: float, params: int,
             weight_bytes: int, kv_dtype: torch.dtype) -> dict:
    """Compute and memory floors of the median decode step at the most frequent batch size.

    params: the whole model's matmul weights per token (all tensor-parallel ranks together);
    weight_bytes: what reading them once takes, as stored (int8 under --quantization int8);
    kv_dtype: the KV pools' dtype (int8 rows under --kv-cache-dtype int8)."""
    steps, counts = result.extra["decode_step_ms_median"], result.extra["decode_step_counts"]
    if not steps:
        return {}
    batch = max(counts, key=lambda b: (counts[b], b))
    step_s = steps[batch] / 1000
    flops = 2 * params * batch
    gemm_only_s = flops / (peak_gflops * 1e9)
    kv_bytes_per_token = loaded.model.kv_cache_spec.bytes_per_block(1, kv_dtype)
    step_bytes = weight_bytes + kv_bytes_per_token * result.extra["decode_context_tokens_median"][batch]
    memory_s = step_bytes / (read_gbps * 1e9)
    return {"decode_batch": batch, "decode_step_ms": round(step_s * 1000, 2),
            "achieved_gflops": round(flops / step_s / 1e9, 1), "peak_gflops": round(peak_gflops, 1),
            "roofline_fraction": round(gemm_only_s / step_s, 3),
            "step_read_mb": round(step_bytes / 1e6, 1), "achieved_read_gbps": round(step_bytes / step_s / 1e9, 1),
            "measured_read_gbps": round(read_gbps, 1), "memory_roofline_fraction": round(memory_s / step_s, 3)}


def run_bench(args) -> int:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, overrides=args.override)
    num_params = sum(p.numel() for p in loaded.model.parameters())  # before packing changes the layouts
    torch.manual_seed(0)
    prompts = make_prompts(args.num_prompts, args.input_len, loaded.tokenizer.vocab_size, args.scenario == "shared-prefix")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=args.enable_prefix_caching,
                          speculative=speculative_config_from_args(args), mla_mode=args.mla_mode,
                          tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype,
                          **({} if args.kv_cache_memory is None else {"kv_cache_memory": args.kv_cache_memory}))
    if args.tensor_parallel_size > 1 and args.baseline != "none":
        print("nanoserve bench: error: --baseline runs one process; use it with --tensor-parallel-size 1", file=sys.stderr)
        return 2
    matmul_params = matmul_params_per_token(loaded.model)  # the whole model's, before sharding
    on_gpu = loaded.device.type == "cuda"  # a GPU finishes 2048^3 in ~25 us: launch and sync would dominate
    peak = gemm_peak_gflops(peak_dtype(loaded), loaded.device, n=8192 if on_gpu else 2048)
    read_gbps = read_bandwidth_gbps(loaded.device, nbytes=(4096 if on_gpu else 512) * 2**20)
    hf_model = None
    if args.baseline == "hf":  # copy the weights before the engine packs them for oneDNN
        try:
            hf_model = to_transformers(loaded)
        except ValueError as error:
            print(f"nanoserve bench: error: {error}", file=sys.stderr)
            return 2
    results = [run_engine(loaded, prompts, args.output_len, config)]
    matmul_bytes = matmul_bytes_per_token(loaded.model, args.tensor_parallel_size)  # as the engine stored them
    kv_dtype = pool_dtype(args.kv_cache_dtype, loaded.dtype)
    results[0].extra.update(roofline(loaded, results[0], peak, read_gbps, matmul_params, matmul_bytes, kv_dtype))
    results[0].extra["peak_rss_gib"] = round(peak_rss_gib(), 2)
    results[0].extra["weights_gib"] = round(weights_gib(loaded.model), 2)  # rank 0's share under TP
    results[0].extra["tensor_parallel_size"] = args.tensor_parallel_size
    results[0].extra["params_m"] = round(num_params / 1e6, 1)
    results[0].extra["kv_cache_gib"] = results[0].extra.pop("kv_cache_gib")
    results[0].extra["kv_bytes_per_token"] = loaded.model.kv_cache_spec.bytes_per_block(1, kv_dtype)
    if args.baseline == "hf":
        results.append(run_hf_generate(loaded, hf_model, prompts, args.output_len))
    elif args.baseline == "naive":
        results.append(run_naive(loaded, prompts, args.output_len))
    if args.structured_output == "json":  # same prompts and engine, every request under a JSON schema
        results.append(run_structured_pairs(loaded, prompts, args.output_len, config))
    print_results(args, loaded, results)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    return 0


def print_results(args, loaded: LoadedModel, results: list[BenchResult]) -> None:
    dtype = str(loaded.dtype).removeprefix("torch.")
    print(f"model {args.model} ({dtype}, {loaded.device}), {args.num_prompts} prompts x "
          f"{args.input_len} in + {args.output_len} out, scenario {args.scenario}, torch threads {torch.get_num_threads()}")
    for r in results:
        print(f"  {r.name:<22} {r.requests_per_s:8.2f} req/s  {r.output_tokens_per_s:9.1f} output tok/s  "
              f"{r.total_tokens_per_s:9.1f} total tok/s  ({r.elapsed_s:.1f}s)")
        for key, value in r.extra.items():
            print(f"      {key}: {value}")
    for other in results[1:]:
        ratio = results[0].output_tokens_per_s / other.output_tokens_per_s
        print(f"  nanoserve / {other.name}: {ratio:.2f}x output tokens/s")
    sys.stdout.flush()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def weights_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
