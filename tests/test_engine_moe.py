"""The engine invariants for MLA and MoE models: greedy output alone = in a batch of mixed
lengths, with and without prefix caching, under preemption and chunked prefill; expert load
reaches the step stats."""
from __future__ import annotations

import pytest
import torch

from models.loader import load_model
from models.moe import moe_layers
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.speculative import SpeculativeConfig
from tests.test_engine import MAX_TOKENS, assert_matches_reference, greedy, make_prompts
from tests.test_speculative import run

CASES = [("tiny-deepseek-v3", "absorbed"), ("tiny-deepseek-v3", "naive"), ("tiny-deepseek-v2", "absorbed"),
         ("tiny-qwen3-moe", "absorbed")]


@pytest.fixture(scope="module")
def models():
    """preset -> fp32 model with routers widened (N(0, 1)) so that tokens really pick different experts."""
    out = {}
    for name in {name for name, _ in CASES}:
        loaded = load_model(f"random:{name}", dtype="float32", device="cpu")
        with torch.no_grad():
            for layer in moe_layers(loaded.model):
                layer.gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
        out[name] = loaded
    return out


@pytest.mark.parametrize("name,mode", CASES)
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batch_of_mixed_lengths_matches_reference(models, name, mode, prefix_caching):
    loaded = models[name]
    engine = Engine(loaded, EngineConfig(num_kv_blocks=256, block_size=4, enable_prefix_caching=prefix_caching,
                                         mla_mode=mode))
    prompts = make_prompts(18, seed=3)
    assert_matches_reference(loaded, engine, prompts)
    assert_matches_reference(loaded, engine, prompts[::-1])
    assert (engine.block_manager.num_prefix_hit_tokens > 0) == prefix_caching


@pytest.mark.parametrize("name,mode", [("tiny-deepseek-v3", "absorbed"), ("tiny-deepseek-v3", "naive"),
                                       ("tiny-qwen3-moe", "absorbed")])
def test_preemption_and_chunked_prefill_keep_output(models, name, mode):
    loaded = models[name]
    small = Engine(loaded, EngineConfig(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64, mla_mode=mode))
    assert_matches_reference(loaded, small, make_prompts(16, seed=1))
    assert small.scheduler.num_preemptions > 0
    chunked = Engine(loaded, EngineConfig(num_kv_blocks=256, block_size=4, max_num_batched_tokens=7, mla_mode=mode))
    assert_matches_reference(loaded, chunked, make_prompts(6, seed=2))


def test_expert_load_reaches_step_stats(models):
    loaded = models["tiny-deepseek-v3"]
    engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("a", list(range(100, 120)), greedy(3))
    _, stats = engine.step()  # the whole prompt
    top_k, num_moe = loaded.model.config.num_experts_per_tok, 1  # 2 layers, the first one dense
    assert stats.num_moe_layers == num_moe and len(stats.expert_tokens) == loaded.model.config.n_routed_experts
    assert sum(stats.expert_tokens) == 20 * top_k * num_moe
    assert len([t for t in stats.expert_tokens if t]) > 2, "tokens spread over several experts"
    _, stats = engine.step()
    assert sum(stats.expert_tokens) == top_k * num_moe, "counted once per step, not accumulated"


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_speculative_verification_rows_match_reference(models, mode):
    """Verification chunks (last token + K drafts) go through MLA's decode path as one row each."""
    loaded = models["tiny-deepseek-v3"]
    spec = SpeculativeConfig("draft", num_tokens=3, max_batch=1000, draft_model="random:tiny-deepseek-v3",
                             draft_num_layers=1)  # an MLA draft too, on its own latent pool
    engine = Engine(loaded, EngineConfig(num_kv_blocks=256, block_size=4, speculative=spec, mla_mode=mode))
    prompts = [[5, 6, 7, 8] * 6, [9, 10] * 9 + [11], make_prompts(1, seed=4)[0]]
    outputs, totals = run(engine, prompts, greedy(MAX_TOKENS))
    assert [c[0].token_ids for c in outputs] == [loaded.model.generate(p, MAX_TOKENS) for p in prompts]
    assert totals["draft_tokens"] > 0 and totals["accepted"] > 0, "verification rows ran"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_unknown_mla_mode_is_refused(models):
    with pytest.raises(ValueError, match="MLA mode"):
        models["tiny-deepseek-v3"].model.set_mla_mode("fast")
