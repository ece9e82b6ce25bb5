"""--kv-cache-dtype int8: quantized rows, attention over them, the pool's size, the engine's invariants."""
from __future__ import annotations

import random

import httpx
import pytest
import torch

from models.attention import build_attention_metadata, paged_attention, write_kv
from models.base import KVCacheSpec
from models.cpu_kernels import can_build
from models.kv_int8 import SCALE_BYTES, dequantize_rows, quantize_rows
from models.loader import load_model
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams
from tests.test_attention import DECODE_PATHS, decode_path_or_skip, dense_attention
from tests.test_engine import assert_batch_invariant, greedy, make_prompts

H, KVH, D, BS = 4, 2, 8, 4


# ---- rows -------------------------------------------------------------------------------------

def test_rows_round_trip_within_half_a_step_and_keep_their_scale_beside_them():
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]  # rows of very different sizes
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (50, 3, 64 + SCALE_BYTES)
    scale = rows[..., 64:].contiguous().view(torch.float32)  # (50, 3, 1)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 127)
    assert rows[..., :64].abs().amax(-1).eq(127).all()  # every row spans the full range
    error = (dequantize_rows(rows, torch.float32) - x).abs()
    assert (error <= scale / 2 * (1 + 1e-5)).all()


def test_a_zero_row_stays_zero():
    rows = quantize_rows(torch.zeros(2, 1, 16))
    assert dequantize_rows(rows, torch.bfloat16).eq(0).all()


def test_the_int8_pool_costs_d_plus_4_bytes_a_row():
    spec = KVCacheSpec(num_layers=12, num_kv_heads=12, head_dim=64)
    assert spec.bytes_per_block(16, torch.bfloat16) == 2 * 12 * 16 * 12 * 64 * 2
    assert spec.bytes_per_block(16, torch.int8) == 2 * 12 * 16 * 12 * 68
    (k, v), *_ = spec.allocate(3, 16, torch.int8)
    assert k.shape == (3, 16, 12, 68) and k.dtype == torch.int8
    assert "(64 + 4 scale) x 1 B" in spec.describe(torch.int8)


def test_the_same_memory_holds_about_twice_the_tokens():
    loaded = load_model("random:tiny-qwen2", dtype="bfloat16", device="cpu")
    sizes = {dtype: Engine(loaded, EngineConfig(kv_cache_memory=2**20, kv_cache_dtype=dtype, max_num_seqs=256)
                           ).block_manager.num_blocks for dtype in ("auto", "int8")}
    head_dim = loaded.model.kv_cache_spec.head_dim
    assert sizes["int8"] == pytest.approx(sizes["auto"] * 2 * head_dim / (head_dim + 4), abs=1)


needs_kernel = pytest.mark.skipif(not can_build(), reason="no compiler or ninja here: the fused kernel cannot build")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpp_store_writes_the_bytes_the_torch_path_writes(dtype):
    """Same scale bits, same rounding (half to even), same slots; strided input rows too."""
    from models.fused_attention import decode_kernel

    assert decode_kernel() is not None  # else both writes would take the PyTorch path
    gen = torch.Generator().manual_seed(2)
    qkv = (torch.randn(40, 3, 4, 64, generator=gen) * torch.logspace(-4, 3, 40)[:, None, None, None]).to(dtype)
    rows = qkv[:, 1]  # (40, 4, 64), not contiguous, as a split of a fused projection is
    rows[0] = 0  # an all-zero row
    rows[1, :, :3] = torch.tensor([1.5, -2.5, 127.0])  # ties after scaling by 127 / 127
    slots = torch.randperm(60, generator=gen)[:40]
    pools = [torch.zeros(15, 4, 4, 64 + SCALE_BYTES, dtype=torch.int8) for _ in range(2)]
    write_kv(rows, rows, (pools[0], pools[0]), slots)
    write_kv(rows, rows, (pools[1], pools[1]), slots, kernel=decode_kernel())
    assert torch.equal(pools[0], pools[1])


# ---- attention over int8 pools ------------------------------------------------------------------

def _mixed_batch(seed: int, pool_dtype: torch.dtype):
    """Decodes, a fresh prefill and a chunk over a cached prefix; returns what paged_attention
    needs and each sequence's full keys/values."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    shapes = [(rng.randint(1, 20), 1) for _ in range(3)] + [(0, rng.randint(2, 9)), (rng.randint(1, 12), rng.randint(2, 7))]
    pool = tuple(torch.zeros(64, BS, KVH, D + SCALE_BYTES * (pool_dtype == torch.int8), dtype=pool_dtype) for _ in range(2))
    free = list(range(64))
    rng.shuffle(free)
    tables, ks, vs, qs = [], [], [], []
    for cached, new in shapes:
        table = [free.pop() for _ in range(-(-(cached + new) // BS))]
        k, v = torch.randn(cached + new, KVH, D, generator=gen), torch.randn(cached + new, KVH, D, generator=gen)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(cached)], dtype=torch.long)
        write_kv(k[:cached], v[:cached], pool, slots)
        tables.append(table), ks.append(k), vs.append(v), qs.append(torch.randn(new, H, D, generator=gen))
    meta = build_attention_metadata([n for _, n in shapes], [c + n for c, n in shapes], tables, BS)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(ks, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(vs, shapes)])
    return torch.cat(qs), new_k, new_v, pool, meta, qs, ks, vs


@pytest.mark.parametrize("seed", range(3))
def test_mixed_batch_over_an_int8_pool_is_dense_attention_over_the_dequantized_cache(seed):
    """Prefill chunks (cached prefix included) and decodes read the same quantized keys and
    values: exactly dense attention over dequantize(quantize(k, v)), and close to the float one."""
    q, new_k, new_v, pool, meta, qs, ks, vs = _mixed_batch(seed, torch.int8)
    out = paged_attention(q, new_k, new_v, pool, meta, D**-0.5)
    roundtrip = [dequantize_rows(quantize_rows(t), torch.float32) for t in ks + vs]
    expected = torch.cat([dense_attention(qi, k, v, D**-0.5) for qi, k, v in zip(qs, roundtrip[:len(ks)], roundtrip[len(ks):])])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    exact = torch.cat([dense_attention(qi, k, v, D**-0.5) for qi, k, v in zip(qs, ks, vs)])
    assert (out - exact).norm() / exact.norm() < 0.02


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("head_dim,block_size", [(8, 4), (64, 16), (128, 4), (128, 16), (256, 16), (48, 16)])
@pytest.mark.parametrize("num_seqs", [1, 10])
@pytest.mark.parametrize("path", DECODE_PATHS)
def test_fused_decode_kernel_reads_int8_rows_like_the_torch_path(dtype, kv_heads, head_dim, block_size, num_seqs, path):
    """Each path of the C++ kernel scales int8 rows in registers (AVX-512 and AVX2 for head dims
    16-256 in powers of 2, the portable path for 8, 48 and the rest); the PyTorch path
    dequantizes what it gathered. One sequence is split into slices of adjacent KV heads over the
    threads, ten are one task each; block size 16 takes the 16-score tree on full chunks (two 8-score ones on AVX2)."""
    from models.fused_attention import fused_decode_attention

    decode_path_or_skip(path)
    gen, rng = torch.Generator().manual_seed(1), random.Random(1)
    lens = ([1, block_size, block_size + 1] + [rng.randint(1, 90) for _ in range(7)])[-num_seqs:]
    free = list(range(512))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    pool = tuple(quantize_rows(torch.randn(512, block_size, kv_heads, head_dim, generator=gen)) for _ in range(2))
    meta = build_attention_metadata([1] * len(lens), lens, tables, block_size)
    q = (3 * torch.randn(len(lens), 4, head_dim, generator=gen)).to(dtype)
    new_kv = torch.randn(len(lens), kv_heads, head_dim, generator=gen).to(dtype)
    reference = paged_attention(q, new_kv, new_kv, pool, meta, head_dim**-0.5)  # quantizes the new token in
    fused = fused_decode_attention(q, pool, meta.block_tables, meta.decode_seq_lens, head_dim**-0.5, path)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, reference, atol=tol, rtol=tol)


# ---- the engine ---------------------------------------------------------------------------------

def _engine(name: str, dtype: str = "bfloat16", **config) -> Engine:
    """An engine with an int8 KV cache on a freshly loaded model."""
    return Engine(load_model(name, dtype=dtype, device="cpu"), EngineConfig(kv_cache_dtype="int8", **config))


@pytest.mark.parametrize("name,config", [
    ("random:tiny-gpt2", dict(num_kv_blocks=256, block_size=4, enable_prefix_caching=True)),
    ("random:tiny-gpt2", dict(num_kv_blocks=256, block_size=4, enable_prefix_caching=False)),
    ("random:tiny-qwen3", dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64)),  # preempts
    ("random:tiny-qwen2", dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64, quantization="int8")),
    # MLA latents, float32: a preempted sequence's recomputed prefill takes MLA's naive path and
    # its decodes the absorbed one, equal to bf16 rounding only (here enough to flip a token)
    ("random:tiny-deepseek-v2", dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64, dtype="float32")),
])
def test_engine_invariants_hold_on_an_int8_cache(name, config):
    """Greedy output alone equals output in a batch, with and without prefix caching, chunked and
    under preemption (int8 weights too); no KV block leaks."""
    engine = _engine(name, **config)
    assert all(pool.dtype == torch.int8 for pools in engine.runner.kv_caches for pool in pools)
    assert_batch_invariant(engine, expect_preemption=config.get("num_kv_blocks") == 24)


@pytest.mark.parametrize("name", ["random:tiny-qwen2", "random:tiny-gpt2", "random:tiny-deepseek-v2"])
def test_int8_cache_scores_a_prompt_like_the_float_cache(name):
    """Prompt logprobs (prefill over a chunked, cached prompt) with the int8 cache stay within a
    few hundredths of a nat of the model-dtype cache's."""
    loaded = load_model(name, dtype="float32", device="cpu")
    prompt = make_prompts(2, seed=5)[1] * 2
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    scores = []
    for kv in ("auto", "int8"):
        engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, kv_cache_dtype=kv))
        choice = engine.generate([prompt], params)[0][0]
        scores.append(torch.tensor([entry[0] for entry in choice.prompt_logprobs[1:]]))
    assert (scores[1] - scores[0]).abs().max() < 0.05
    assert not torch.equal(scores[0], scores[1])  # the cache really was quantized


@needs_kernel
def test_fused_kernel_and_torch_path_give_the_same_greedy_tokens():
    outputs = []
    for fast in (False, True):
        engine = _engine("random:tiny-qwen2", "float32", num_kv_blocks=64, block_size=4, fast_kernels=fast)
        assert engine.runner.kernels.name == ("cpu" if fast else "reference")
        outputs.append([c[0].token_ids for c in engine.generate(make_prompts(4, seed=3), greedy())])
    assert outputs[0] == outputs[1]


# ---- serving --------------------------------------------------------------------------------------

def test_server_takes_int8_weights_and_cache_from_the_environment():
    """NANOSERVE_QUANTIZATION and NANOSERVE_KV_CACHE_DTYPE (what compose sets): /server_info says
    how weights and cache are stored, the OpenAI client gets its completion, nothing stays held."""
    from tests.api_fixtures import TINY_MODEL, assert_idle, run_server

    env = {"NANOSERVE_QUANTIZATION": "int8", "NANOSERVE_KV_CACHE_DTYPE": "int8"}
    with run_server("--dtype", "bfloat16", env=env) as server:
        info = httpx.get(server.url + "/server_info").json()
        assert (info["quantization"], info["kv_cache_dtype"]) == ("int8", "int8")
        completion = server.openai().completions.create(model=TINY_MODEL, prompt="int8 weights, keys and values",
                                                        max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
        assert_idle(server)


def test_tensor_parallel_ranks_quantize_their_heads_like_one_process():
    """Scales are per KV head, so each rank's share of the heads holds the rows one process would:
    TP=2 gives TP=1's tokens and prompt logprobs (float32)."""
    from tests.test_tensor_parallel import run_and_close, scored, tp_engine

    prompts = make_prompts(4, seed=4)
    params = greedy(6, prompt_logprobs=1)
    one, two = (run_and_close(tp_engine("random:tiny-qwen2", tp, None, max_num_batched_tokens=16, kv_cache_dtype="int8"),
                              prompts, params) for tp in (1, 2))
    for a, b in zip(one, two):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(scored(b)), torch.tensor(scored(a)), atol=1e-4, rtol=0)
