"""The kernel seam (models/kernels.py) and the step's tensors (models/attention.py).

- Every backend serves the same greedy tokens as the reference: the engine on the Triton
  backend runs here on CPU tensors under the Triton interpreter (set before the kernels' module
  is first imported), through prefix caching, chunked prefill and preemption.
- Binding kernels swaps no module: the model's layers stay the classes its file builds.
- The step's slot mapping, positions and block tables, built by tensor ops, equal the per-token
  definition (`slot = block_table[p // BS] * BS + p % BS`).
"""
from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from models.attention import PagedAttention, build_attention_metadata, paged_attention  # noqa: E402
from models.kernels import bind_kernels, select_kernels, triton_paged_attention  # noqa: E402
from models.layers import Linear, RMSNorm  # noqa: E402
from models.loader import load_model  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import Engine  # noqa: E402
from tests.test_engine import greedy, make_prompts  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _outputs(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [c[0].token_ids for c in engine.generate(prompts, greedy(6))]


@pytest.mark.parametrize("name,config", [
    ("random:tiny-gpt2", dict(num_kv_blocks=64)),                                     # MHA, prefix hits
    ("random:tiny-qwen3", dict(num_kv_blocks=5, max_num_batched_tokens=24)),         # GQA, chunks, preempts
])
def test_triton_backend_serves_the_reference_tokens(name, config):
    loaded = load_model(name, dtype="float32", device=str(DEVICE))
    prompts = make_prompts(4, seed=5)
    # one engine at a time: an engine binds the model to its pools and kernels when it is built
    reference = _outputs(Engine(loaded, EngineConfig(block_size=16, kernel_backend="reference", **config)), prompts)
    engine = Engine(loaded, EngineConfig(block_size=16, kernel_backend="triton", **config))
    assert engine.runner.kernels.name == "triton"
    assert all(m.attend is triton_paged_attention for m in loaded.model.modules() if isinstance(m, PagedAttention))
    assert _outputs(engine, prompts) == reference
    assert [_outputs(engine, [p])[0] for p in prompts[:2]] == reference[:2]
    if config["num_kv_blocks"] == 5:
        assert engine.scheduler.num_preemptions > 0
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_binding_kernels_swaps_no_module():
    """The runner packs the linears and binds the C++ kernels; every module keeps its class and
    place, the packed weight hangs under its Linear, and the reference can be bound back."""
    loaded = load_model("random:tiny-qwen2", dtype="bfloat16", device="cpu")
    model = loaded.model
    before = {name: type(m) for name, m in model.named_modules()}
    cpu = select_kernels(torch.device("cpu"), True, torch.bfloat16, 16)
    bind_kernels(model, cpu)
    after = {name: type(m) for name, m in model.named_modules() if not name.endswith(".kernel")}
    assert after == before
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.norm is cpu.rms_norm for m in norms)
    assert all(m.attend is cpu.attention for m in model.modules() if isinstance(m, PagedAttention))
    if cpu.pack_linears and any(m.kernel is not None for m in model.modules() if isinstance(m, Linear)):
        assert all(m.weight is None for m in model.modules() if isinstance(m, Linear) and m.kernel is not None)
    reference = select_kernels(torch.device("cpu"), False, torch.bfloat16, 16)
    assert reference.name == "reference" and reference.attention is paged_attention
    bind_kernels(model, reference)
    assert all(m.attend is paged_attention for m in model.modules() if isinstance(m, PagedAttention))


def test_backend_choice():
    cpu = torch.device("cpu")
    assert select_kernels(cpu, True, torch.bfloat16, 64).name == "cpu"
    assert select_kernels(cpu, False, torch.bfloat16, 64).name == "reference"
    assert select_kernels(torch.device("cuda"), True, torch.bfloat16, 64).name == "triton"
    int8_cache = select_kernels(torch.device("cuda"), True, torch.int8, 64)
    assert int8_cache.name == "reference" and "int8" in int8_cache.description
    for block_size in (4, 8, 24):  # the kernel tiles pages of a power of two >= 16: fall back, never crash
        small = select_kernels(torch.device("cuda"), True, torch.bfloat16, 64, block_size=block_size)
        assert small.name == "reference" and f"block size {block_size}" in small.description
    assert select_kernels(torch.device("cuda"), True, torch.bfloat16, 64, block_size=32).name == "triton"
    with pytest.raises(AssertionError, match="kernel backend"):
        EngineConfig(kernel_backend="tpu")


@pytest.mark.parametrize("seed", range(4))
def test_step_tensors_equal_the_per_token_definition(seed):
    """Random mixed batches: decodes, verification chunks (several rows each), prefill chunks
    over a cached prefix; shuffled block ids."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    num_decode = rng.randint(0, 4)
    query_lens = [rng.choice([1, 1, 3]) for _ in range(num_decode)] + [rng.randint(2, 30) for _ in range(rng.randint(0, 3))]
    if not query_lens:
        query_lens = [5]
    seq_lens = [q + rng.randint(0, 40) for q in query_lens]
    ids = list(range(200))
    rng.shuffle(ids)
    tables = []
    for s_len in seq_lens:
        n = -(-s_len // block_size)
        tables.append([ids.pop() for _ in range(n)])
    tokens = [rng.randrange(1000) for _ in range(sum(query_lens))]
    meta = build_attention_metadata(query_lens, seq_lens, tables, block_size, "cpu", num_decode, tokens, [0, 2])
    positions = [p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)]
    slots = [t[p // block_size] * block_size + p % block_size
             for t, q, s in zip(tables, query_lens, seq_lens) for p in range(s - q, s)]
    assert meta.input_ids.tolist() == tokens and meta.logit_rows.tolist() == [0, 2]
    assert meta.positions.tolist() == positions
    assert meta.slot_mapping.tolist() == slots
    width = max(map(len, tables))
    assert meta.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
    assert meta.query_start_loc_t.tolist() == meta.query_start_loc and meta.seq_lens_t.tolist() == seq_lens
    rows = sum(query_lens[:num_decode])
    assert meta.num_decode_tokens == rows
    if rows:
        row_lens = [p + 1 for p in positions[:rows]]
        assert meta.decode_seq_lens.tolist() == row_lens
        row_tables = [tables[s] for s in range(num_decode) for _ in range(query_lens[s])]
        assert [t[:len(table)] for t, table in zip(meta.decode_block_tables.tolist(), row_tables)] == row_tables
        mask = meta.decode_key_mask[:, 0, 0]  # (R, L)
        assert mask.sum(1).tolist() == row_lens


def test_triton_backend_attends_like_the_reference_on_one_mixed_step():
    """One packed step (decodes, a verification chunk, a prefill over a cached prefix), through
    both backends' attention, pools written by each."""
    gen = torch.Generator().manual_seed(0)
    query_lens, seq_lens, block_size = [1, 1, 3, 12], [9, 30, 20, 40], 16
    tables = [[3], [5, 1], [7, 2], [0, 4, 6]]
    n, kvh, h, d = sum(query_lens), 2, 4, 16
    q, k, v = (torch.randn(n, heads, d, generator=gen).to(DEVICE) for heads in (h, kvh, kvh))
    outs = []
    for attend in (paged_attention, triton_paged_attention):
        pools = tuple(torch.randn(8, block_size, kvh, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
                      for _ in range(2))
        meta = build_attention_metadata(query_lens, seq_lens, tables, block_size, DEVICE, 3)
        outs.append(attend(q, k, v, pools, meta, d**-0.5))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
