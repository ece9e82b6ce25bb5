"""The batched engine against the model's naive reference decoder, request by request.

Greedy output must not depend on batching, prefix caching, chunked prefill or preemption.
"""
from __future__ import annotations

import random

import pytest
import torch

from models.loader import load_model
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import RequestRejected

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def tiny_gpt2():
    return load_model("random:tiny-gpt2", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tiny_qwen3():
    return load_model("random:tiny-qwen3", dtype="float32", device="cpu")


def make_prompts(num: int, seed: int = 0, shared_prefix: int = 20) -> list[list[int]]:
    """Prompts of 3..40 tokens; every other one starts with the same prefix (cache hits)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(50000) for _ in range(shared_prefix)]
    prompts = []
    for i in range(num):
        tail = [rng.randrange(50000) for _ in range(rng.randint(3, 20))]
        prompts.append(prefix + tail if i % 2 else tail)
    return prompts


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def assert_batch_invariant(engine: Engine, expect_preemption: bool) -> None:
    """Greedy output of 12 prompts alone equals their output in one batch and in a reversed batch
    (cached prefixes, when prefix caching is on); no KV block is held afterwards."""
    prompts = make_prompts(12, seed=1)
    alone = [engine.generate([p], greedy())[0][0].token_ids for p in prompts]
    batched = [c[0].token_ids for c in engine.generate(prompts, greedy())]
    assert batched == alone
    again = [c[0].token_ids for c in engine.generate(prompts[::-1], greedy())][::-1]
    assert again == alone
    if expect_preemption:  # recomputed prefills of preempted sequences: prefill = decode
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def assert_matches_reference(loaded, engine: Engine, prompts: list[list[int]]) -> None:
    results = engine.generate(prompts, greedy())
    for prompt, (choice,) in zip(prompts, results):
        assert choice.token_ids == loaded.model.generate(prompt, MAX_TOKENS), f"prompt of {len(prompt)} tokens"
        assert choice.finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "leaked blocks"


def test_single_request_matches_reference(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=64, block_size=4))
    assert_matches_reference(tiny_gpt2, engine, make_prompts(1))


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_concurrent_requests_match_reference(tiny_gpt2, prefix_caching):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=256, block_size=4, enable_prefix_caching=prefix_caching))
    prompts = make_prompts(18)
    assert_matches_reference(tiny_gpt2, engine, prompts)
    assert_matches_reference(tiny_gpt2, engine, prompts[::-1])  # a second wave finds cached blocks
    hits = engine.block_manager.num_prefix_hit_tokens
    assert (hits > 0) if prefix_caching else (hits == 0)


def test_preemption_keeps_output_unchanged(tiny_qwen3):
    engine = Engine(tiny_qwen3, EngineConfig(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64))
    assert_matches_reference(tiny_qwen3, engine, make_prompts(16, seed=1))
    assert engine.scheduler.num_preemptions > 0


def test_chunked_prefill_matches_reference(tiny_qwen3):
    engine = Engine(tiny_qwen3, EngineConfig(num_kv_blocks=256, block_size=4, max_num_batched_tokens=7))
    prompts = make_prompts(6, seed=2)
    assert max(len(p) for p in prompts) > 7
    assert_matches_reference(tiny_qwen3, engine, prompts)


def test_seeded_sampling_is_independent_of_companions(tiny_gpt2):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)
    alone = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4)).generate([[1, 2, 3]], params)
    noise = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4))
    crowd = engine.generate([[7, 8], [1, 2, 3], [9] * 5], [noise, params, noise])
    assert crowd[1][0].token_ids == alone[0][0].token_ids


def test_n_choices_share_the_prompt_and_differ(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4))
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    (choices,) = engine.generate([list(range(100, 140))], params)
    assert [c.index for c in choices] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in choices}) > 1
    assert engine.block_manager.num_prefix_hit_tokens > 0, "later choices reuse the prompt's blocks"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_stop_string_spanning_tokens_is_cut(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4))
    prompt = tiny_gpt2.tokenizer.encode("The quick brown fox")
    (full,) = engine.generate([prompt], greedy(12, skip_special_tokens=False))
    text = full[0].text
    stop = text[len(text) // 3: len(text) // 3 + 4]
    assert len(stop) == 4
    (cut,) = engine.generate([prompt], greedy(12, stop=[stop]))
    assert cut[0].text == text[: text.index(stop)]
    assert cut[0].finish_reason == "stop"


def test_abort_frees_blocks_and_reports(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4))
    for i, prompt in enumerate(make_prompts(6)):
        engine.add_request(f"r{i}", prompt, greedy(30))
    reasons = {}
    for step in range(40):
        if step == 3:
            engine.abort("r1")
            engine.abort("r4")
            engine.abort("unknown")
        deltas, _ = engine.step()
        reasons.update({d.request_id: d.finish_reason for d in deltas if d.finished})
        if not engine.has_unfinished():
            break
    assert reasons["r1"] == reasons["r4"] == "abort"
    assert reasons["r0"] == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.requests


@pytest.mark.parametrize("chunk", [2048, 5])
def test_prompt_logprobs_for_echo_scoring(tiny_gpt2, chunk):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4, max_num_batched_tokens=chunk))
    prompt = list(range(300, 317))
    (choice,), = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert choice.token_ids == [] and choice.finish_reason == "length"
    expected = torch.log_softmax(tiny_gpt2.model.full_logits(prompt), dim=-1)  # (T, V)
    assert choice.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        logprob, top = choice.prompt_logprobs[pos]
        assert logprob == pytest.approx(expected[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert top[0][0] == int(expected[pos - 1].argmax())


def test_sampled_logprobs_match_reference(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4))
    prompt = [5, 6, 7, 8]
    (choice,), = engine.generate([prompt], greedy(3, logprobs=3))
    tokens = prompt + choice.token_ids
    expected = torch.log_softmax(tiny_gpt2.model.full_logits(tokens), dim=-1)
    for i, (logprob, top) in enumerate(choice.logprobs):
        row = expected[len(prompt) - 1 + i]
        assert logprob == pytest.approx(row[choice.token_ids[i]].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()


def test_admission_rejects_what_can_never_fit(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=8, block_size=4))  # 32-token pool
    with pytest.raises(RequestRejected, match="32"):
        engine.add_request("big", list(range(20)), greedy(20))
    with pytest.raises(ValueError):
        engine.add_request("bad-ids", [10**9], greedy())
    assert not engine.has_unfinished()


def test_unbounded_max_tokens_stops_at_context(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=8, block_size=4))  # context capped at 32
    (choice,), = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert choice.finish_reason == "length" and choice.num_output_tokens == 29


def test_min_tokens_holds_off_stop_strings(tiny_gpt2):
    """A stop string that appears before min_tokens does not end the request; one after does."""
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=128, block_size=4))
    prompt = tiny_gpt2.tokenizer.encode("The quick brown fox")
    (full,) = engine.generate([prompt], greedy(12))
    first_token_text = tiny_gpt2.tokenizer.decode(full[0].token_ids[:1])
    assert first_token_text and full[0].text.startswith(first_token_text)
    (early,) = engine.generate([prompt], greedy(12, stop=[first_token_text]))
    assert early[0].text == "" and early[0].finish_reason == "stop"
    (held,) = engine.generate([prompt], greedy(12, stop=[first_token_text], min_tokens=6))
    assert len(held[0].token_ids) >= 6 and held[0].text.startswith(first_token_text)
    later = full[0].text.find(first_token_text, len(tiny_gpt2.tokenizer.decode(full[0].token_ids[:6])))
    assert held[0].text == (full[0].text if later < 0 else full[0].text[:later])


def test_prompt_only_requests_count_their_prompt_tokens(tiny_gpt2):
    """max_tokens 0 samples nothing, yet its prompt was computed: the step stats (which the log
    line and Prometheus both read) count it once."""
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("score", [1, 2, 3, 4, 5, 6], greedy(0, prompt_logprobs=0))
    prompt_tokens = 0
    while engine.has_unfinished():
        prompt_tokens += engine.step()[1].num_prompt_tokens
    assert prompt_tokens == 6


def test_step_stats_count_tokens(tiny_gpt2):
    engine = Engine(tiny_gpt2, EngineConfig(num_kv_blocks=64, block_size=4))
    engine.add_request("a", [1, 2, 3, 4, 5], greedy(4))
    generated, prompt_tokens, finished = 0, 0, []
    while engine.has_unfinished():
        _, stats = engine.step()
        generated += stats.num_generation_tokens
        prompt_tokens += stats.num_prompt_tokens
        finished += stats.finished
    assert (generated, prompt_tokens) == (4, 5)
    assert len(finished) == 1 and finished[0].num_generation_tokens == 4
    assert finished[0].time_to_first_token <= finished[0].e2e_latency
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0


def test_fast_kernels_match_the_reference_path():
    """oneDNN-packed linears (bf16) give the same greedy tokens as plain F.linear."""
    outputs = []
    for fast in (False, True):
        loaded = load_model("random:tiny-qwen2", dtype="bfloat16", device="cpu")
        engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=4, fast_kernels=fast))
        outputs.append([c[0].token_ids for c in engine.generate(make_prompts(4, seed=3), greedy())])
    assert outputs[0] == outputs[1]
