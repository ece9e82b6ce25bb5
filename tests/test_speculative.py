"""Speculative decoding keeps the output: greedy token for token, sampling in distribution.

Engines run tiny random models in float32; speculation is forced on for any batch size
(max_batch) so every decode verifies drafts.
"""
from __future__ import annotations

import collections

import pytest
import torch

from models.loader import load_model
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.outputs import merge_delta
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.engine.speculative import SpeculativeConfig, accept_sampled, ngram_lookup
from tests.test_engine import make_prompts

NGRAM = SpeculativeConfig("ngram", num_tokens=4, max_batch=1000, ngram_min=1)
DRAFT = SpeculativeConfig("draft", num_tokens=3, max_batch=1000, draft_model="random:tiny-qwen3", draft_num_layers=1)


@pytest.fixture(scope="module")
def tiny_qwen3():
    return load_model("random:tiny-qwen3", dtype="float32", device="cpu")


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run(engine: Engine, prompts, params, abort_at: dict[str, int] | None = None):
    """generate(), plus the step stats summed, plus aborts at given steps."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"r{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params_list):
        engine.add_request(request_id, prompt, SamplingParams(**{f: getattr(p, f) for f in p.__dataclass_fields__}))
    merged, totals, step = {}, collections.Counter(), 0
    while engine.has_unfinished():
        for request_id, at in (abort_at or {}).items():
            if step == at:
                engine.abort(request_id)
        deltas, stats = engine.step()
        step += 1
        for delta in deltas:
            merge_delta(merged, delta)
        totals.update(drafts=stats.num_spec_drafts, draft_tokens=stats.num_spec_draft_tokens,
                      accepted=stats.num_spec_accepted_tokens, generated=stats.num_generation_tokens,
                      preemptions=stats.num_preemptions, steps=1)
    return [[merged[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, params_list)], totals


def engine_config(spec, **kw) -> EngineConfig:
    return EngineConfig(**{"num_kv_blocks": 256, "block_size": 4, "speculative": spec, **kw})


@pytest.mark.parametrize("spec", [NGRAM, DRAFT], ids=["ngram", "draft"])
@pytest.mark.parametrize("config", [dict(), dict(num_kv_blocks=40, max_num_batched_tokens=48),
                                    dict(enable_prefix_caching=False, max_num_batched_tokens=9)],
                         ids=["prefix-cache", "preempting", "no-cache-chunked"])
def test_greedy_output_is_unchanged(tiny_qwen3, spec, config):
    """18 concurrent requests of mixed lengths (half share a prefix), twice (cache hits)."""
    prompts = make_prompts(18, seed=4)
    plain, _ = run(Engine(tiny_qwen3, EngineConfig(num_kv_blocks=256, block_size=4)), prompts, greedy())
    engine = Engine(tiny_qwen3, engine_config(spec, **config))
    for wave in (prompts, prompts[::-1]):
        outputs, totals = run(engine, wave, greedy())
        expected = plain if wave is prompts else plain[::-1]
        assert [c[0].token_ids for c in outputs] == [c[0].token_ids for c in expected]
        assert all(c[0].finish_reason == "length" and c[0].num_output_tokens == 24 for c in outputs)
        assert totals["accepted"] > 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "leaked blocks"
    if "num_kv_blocks" in config:
        assert engine.scheduler.num_preemptions > 0
    if config.get("enable_prefix_caching", True):
        assert engine.block_manager.num_prefix_hit_tokens > 0


def test_acceptance_counters_on_a_repetitive_prompt(tiny_qwen3):
    """A greedy random model falls into a loop; n-gram lookup then proposes the loop and the
    target accepts it: counters move, and several tokens come per step."""
    engine = Engine(tiny_qwen3, engine_config(NGRAM))
    ((choice,),), totals = run(engine, [[5, 6, 7, 8] * 8], greedy(64))
    assert totals["drafts"] > 0 and totals["draft_tokens"] >= totals["drafts"]
    assert 0 < totals["accepted"] <= totals["draft_tokens"]
    assert totals["generated"] == 64 and totals["steps"] < 64 * 0.6
    ((off,),), off_totals = run(engine, [[5, 6, 7, 8] * 8], greedy(64, speculative=False))
    assert off.token_ids == choice.token_ids and off_totals["drafts"] == 0


def test_speculation_backs_off_above_max_batch(tiny_qwen3):
    spec = SpeculativeConfig("ngram", num_tokens=4, max_batch=3, ngram_min=1)
    engine = Engine(tiny_qwen3, engine_config(spec))
    _, crowded = run(engine, [[5, 6, 7, 8] * 8] * 4, greedy(32))
    assert crowded["drafts"] == 0
    _, few = run(engine, [[5, 6, 7, 8] * 8] * 3, greedy(32))
    assert few["drafts"] > 0


def test_stop_conditions_are_exact():
    """max_tokens is never passed, a stop string or stop id inside accepted drafts ends the
    output there, min_tokens holds per verified position, and tokens, text, logprobs and usage
    agree with plain decoding. (This model's greedy output: ' x' * 4 then ' TM' repeated.)"""
    model = load_model("random:tiny-gpt2", dtype="float32", device="cpu")
    prompt = [776, 911, 430, 41, 265, 988, 523, 497, 414]
    plain_engine, spec_engine = Engine(model, engine_config(None)), Engine(model, engine_config(NGRAM))
    ((full,),), _ = run(plain_engine, [prompt], greedy(40))
    repeated = full.token_ids[-1]
    stop_text = model.tokenizer.decode([repeated] * 3)
    cases = [greedy(13), greedy(40, stop=[stop_text]), greedy(40, stop_token_ids=[repeated], min_tokens=9),
             greedy(40, logprobs=2)]
    for params in cases:
        ((expected,),), _ = run(plain_engine, [prompt], params)
        ((got,),), totals = run(spec_engine, [prompt], params)
        assert totals["accepted"] > 0
        assert (got.token_ids, got.text, got.finish_reason, got.num_output_tokens) == \
            (expected.token_ids, expected.text, expected.finish_reason, expected.num_output_tokens)
        if params.logprobs:
            for (lp, top), (lp_ref, top_ref) in zip(got.logprobs, expected.logprobs, strict=True):
                assert lp == pytest.approx(lp_ref, abs=1e-4)
                assert [t for t, _ in top] == [t for t, _ in top_ref]
    assert spec_engine.block_manager.num_free_blocks == spec_engine.block_manager.num_blocks


def test_abort_in_the_middle_of_speculation_leaks_nothing(tiny_qwen3):
    for spec in (NGRAM, DRAFT):
        engine = Engine(tiny_qwen3, engine_config(spec))
        prompts = [[5, 6, 7, 8] * 6, [9, 10, 11] * 9] + make_prompts(4, seed=5)
        outputs, totals = run(engine, prompts, greedy(40), abort_at={"r0": 4, "r1": 6, "r3": 5})
        assert totals["accepted"] > 0
        assert [c[0].finish_reason for c in outputs] == ["abort", "abort", "length", "abort", "length", "length"]
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.requests and not engine.scheduler.has_unfinished()


def test_n_choices_and_penalties_speculate_too(tiny_qwen3):
    """n > 1 (forked choices share the prompt) and penalties (each verified position sees the
    drafts before it as output) give the plain greedy tokens."""
    prompt = [5, 6, 7, 8] * 8
    for params in (greedy(30, n=2), greedy(30, repetition_penalty=1.01, frequency_penalty=0.01)):
        (expected,), _ = run(Engine(tiny_qwen3, engine_config(None)), [prompt], params)
        (got,), totals = run(Engine(tiny_qwen3, engine_config(NGRAM)), [prompt], params)
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        assert totals["accepted"] > 0


def test_structured_output_under_speculation(tiny_qwen3):
    """Drafts the grammar forbids are never verified; greedy output equals plain decoding."""
    prompt = [5, 6, 7, 8] * 8
    params = greedy(12, grammar=GrammarSpec("regex", "(ab|cd|[0-9]){1,40}"))
    (expected,), _ = run(Engine(tiny_qwen3, engine_config(None)), [prompt], params)
    (got,), totals = run(Engine(tiny_qwen3, engine_config(DRAFT)), [prompt], params)
    assert got[0].token_ids == expected[0].token_ids and got[0].text == expected[0].text
    assert totals["drafts"] > 0


def test_sampling_keeps_the_target_distribution(nanogpt_checkpoint):
    """Speculative sampling (n-gram and a 1-layer draft, rejection sampling) against plain
    sampling over 2000 unseeded requests of a char-level model (15 tokens): the distribution of
    each output token agrees within sampling noise (total variation ~0.05 between two samples).
    The scaled head makes drafts often, but far from always, accepted; keeping every draft, or
    drawing the correction from p instead of the residual, moves them well past the bound."""
    root, _ = nanogpt_checkpoint
    model = load_model(str(root), dtype="float32", device="cpu")
    with torch.no_grad():
        model.model.lm_head.weight.mul_(5.0)
    prompts = [model.tokenizer.encode("hello world, hello world, hello")] * 2000
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    config = dict(num_kv_blocks=24000, max_num_seqs=2000, max_num_batched_tokens=65536)
    draft = SpeculativeConfig("draft", num_tokens=3, max_batch=10**6, draft_model=str(root), draft_num_layers=1)
    torch.manual_seed(0)
    plain, _ = run(Engine(model, engine_config(None, **config)), prompts, params)
    for spec in (SpeculativeConfig("ngram", num_tokens=4, max_batch=10**6, ngram_min=1), draft):
        torch.manual_seed(1)
        got, totals = run(Engine(model, engine_config(spec, **config)), prompts, params)
        assert 500 < totals["accepted"] < 0.6 * totals["draft_tokens"], "both accept and reject paths ran"
        for position in range(1, 6):
            expected = collections.Counter(c[0].token_ids[position] for c in plain)
            counts = collections.Counter(c[0].token_ids[position] for c in got)
            tv = sum(abs(expected[t] - counts[t]) for t in expected.keys() | counts.keys()) / (2 * len(prompts))
            assert tv < 0.1, f"{spec.method}, output token {position}: total variation {tv:.3f}"


def test_rejection_sampling_is_exact():
    """accept_sampled's first emitted token follows p, for a point-mass and a dense draft."""
    torch.manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])  # (K+1, V), K = 1
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # (K, V)
    for draft_q in (None, q):
        counts = torch.zeros(4)
        for _ in range(6000):
            draft = 1 if draft_q is None else int(torch.multinomial(q[0], 1))
            accepted, token = accept_sampled(p, [draft], draft_q)
            counts[draft if accepted else token] += 1
        assert torch.allclose(counts / counts.sum(), p[0], atol=0.02), counts


def test_ngram_lookup():
    assert ngram_lookup([1, 2, 3, 4, 1, 2, 3], 3, 2, 4) == [4, 1, 2]
    assert ngram_lookup([1, 2, 3, 4, 9, 2, 3], 3, 2, 4) == [4, 9, 2]  # the 2-gram "2 3"
    assert ngram_lookup([1, 2, 3, 4, 9, 8, 3], 3, 2, 4) == []        # only a 1-gram
    assert ngram_lookup([1, 2, 3, 4, 9, 8, 3], 3, 1, 4) == [4, 9, 8]
    assert ngram_lookup([7, 7, 7, 7, 7, 7], 3, 1, 2) == [7, 7, 7]     # a run: the match with k tokens after it
    assert ngram_lookup([1, 2, 5, 1, 2, 6, 1, 2], 2, 2, 4) == [6, 1]  # the most recent match


def test_lookahead_is_capped_and_never_preempts():
    """The scheduler reserves at most max_tokens - output - 1 slots (a step emits drafts + 1),
    and only from free blocks: short on memory, a decode gets its one token, nobody is preempted."""
    from server.engine.kv_cache import BlockManager
    from server.engine.scheduler import Scheduler
    from server.engine.sequence import Sequence

    def decode_step(sched, seqs):
        for seq in seqs:
            seq.append_token(9)
        return {c.seq.seq_id: c.num_spec_slots for c in sched.schedule().chunks}

    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, 8, 64, 64, num_speculative_tokens=4, speculative_max_batch=8)
    short = Sequence(0, "a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    long = Sequence(1, "b", [1, 2, 3, 4, 5, 6, 7], SamplingParams(temperature=0, max_tokens=8))
    sched.add(short), sched.add(long)
    sched.update_after_step(sched.schedule())                     # prefill: 1 + 2 blocks
    slots = decode_step(sched, [short, long])
    assert slots[0] == 1                                          # max_tokens 3: one emitted, 1 draft + 1 left
    assert slots[1] == 0 and sched.num_preemptions == 0           # 4 slots need a 4th block: only 1 is free
    assert len(long.block_table) == 2 and len(short.block_table) == 2



def test_draft_budget_adapts_and_pauses():
    """A sequence whose drafts keep failing drops to no drafts for PAUSE_TOKENS tokens, then
    probes with one; one whose drafts all pass climbs back to K."""
    from server.engine.outputs import StepStats
    from server.engine.step_plan import ScheduledChunk
    from server.engine.sequence import Sequence
    from server.engine.speculative import PAUSE_TOKENS, after_verification

    seq = Sequence(0, "a", [1, 2, 3], greedy(100))
    seq.num_computed_tokens = 2
    stats = StepStats(0, 0, 0.0)
    budgets = []
    for accepted in (0, 0, 0, 0):
        chunk = ScheduledChunk(seq, 1, num_spec_slots=4)
        chunk.set_drafts([7] * (seq.spec_budget or 4))
        chunk.num_accepted = accepted
        after_verification([chunk], stats, max_drafts=4)
        budgets.append(seq.spec_budget)
    assert budgets == [3, 2, 1, 0] and seq.spec_resume_at == seq.num_output_tokens + PAUSE_TOKENS
    assert (stats.num_spec_drafts, stats.num_spec_draft_tokens, stats.num_spec_accepted_tokens) == (4, 10, 0)
    for _ in range(3):  # probing with one draft that passes: back up towards K
        chunk = ScheduledChunk(seq, 1, num_spec_slots=4)
        chunk.set_drafts([7] * max(seq.spec_budget, 1))
        chunk.num_accepted = len(chunk.draft_token_ids)
        after_verification([chunk], stats, max_drafts=4)
    assert seq.spec_budget == 4


def test_a_lone_sequence_with_free_drafts_keeps_k():
    """Paused (budget 0) a sequence gets no slots, unless it runs alone with the n-gram
    proposer, whose failed drafts cost nothing to make and little to verify."""
    from server.engine.kv_cache import BlockManager
    from server.engine.scheduler import Scheduler
    from server.engine.sequence import Sequence

    for free, expected in ((False, 0), (True, 4)):
        sched = Scheduler(BlockManager(16, 4), 8, 64, 64, num_speculative_tokens=4, speculative_max_batch=8,
                          free_drafts=free)
        seq = Sequence(0, "a", [1, 2, 3], greedy(30))
        sched.add(seq)
        sched.update_after_step(sched.schedule())
        seq.append_token(9)
        seq.spec_budget, seq.spec_resume_at = 0, 20
        (chunk,) = sched.schedule().chunks
        assert chunk.num_spec_slots == expected
