"""Structured output below the HTTP layer: the grammar compiler's cache and errors, the bitmask
against a per-token reference, the sampler's mixed batches, and the engine invariants (n > 1,
preemption, aborts) for constrained requests."""
from __future__ import annotations

import json
import re

import pytest
import torch

from models.loader import load_model
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler, InvalidGrammar, apply_bitmask
from server.engine.sampler import Sampler, SamplingRow, needs_mask_first
from server.engine.sampling_params import GrammarSpec, SamplingParams

DIGITS = GrammarSpec("regex", "[0-9]{2,6}")
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "tags": {"type": "array", "maxItems": 2,
                                                                              "items": {"enum": ["x", "y"]}}},
          "required": ["n", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny-qwen2", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def compiler(tiny):
    return GrammarCompiler(tiny.tokenizer)


def test_each_spec_is_compiled_once_and_bad_ones_say_why(compiler):
    assert compiler.compile(DIGITS) is compiler.compile(GrammarSpec("regex", "[0-9]{2,6}"))
    assert compiler.compile(DIGITS) is not compiler.compile(GrammarSpec("regex", "[0-9]{2,7}"))
    with pytest.raises(InvalidGrammar, match="unclosed group"):
        compiler.compile(GrammarSpec("regex", "a(b"))
    with pytest.raises(InvalidGrammar):
        compiler.compile(GrammarSpec("json_schema", '{"type": "nonsense"}'))


def test_bitmask_allows_exactly_the_grammars_tokens(compiler, tiny):
    tokenizer = tiny.tokenizer
    matchers = [compiler.matcher(DIGITS), None, compiler.matcher(GrammarSpec("choice", json.dumps(["yes", "no"])))]
    vocab_size = tiny.model.lm_head.out_features  # the model pads the vocabulary past the tokenizer's
    assert vocab_size > tokenizer.vocab_size
    bitmask = compiler.fill_bitmask(matchers, vocab_size)
    masked = apply_bitmask(torch.zeros(3, vocab_size), bitmask)
    allowed = [set(torch.nonzero(row == 0).flatten().tolist()) for row in masked]
    assert allowed.pop(1) == set(range(vocab_size))  # a row without a grammar keeps every token
    digit_tokens = {i for i in range(tokenizer.vocab_size)
                    if not tokenizer.is_special(i) and re.fullmatch(rb"[0-9]{1,6}", tokenizer.token_bytes(i))}
    assert allowed[0] == digit_tokens  # no EOS yet: two digits are the minimum
    assert {tokenizer.decode([i]) for i in allowed[1]} >= {"yes", "no"}
    assert all("yes".startswith(tokenizer.decode([i])) or "no".startswith(tokenizer.decode([i])) for i in allowed[1])
    assert max(allowed[0] | allowed[1]) < tokenizer.vocab_size


def test_apply_bitmask_matches_a_bit_by_bit_reference():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=gen)  # 160 ids
    logits = torch.randn(3, 150, generator=gen)
    expected = logits.clone()
    for row in range(3):
        for token in range(150):
            if not (int(bitmask[row, token // 32]) >> (token % 32)) & 1:
                expected[row, token] = float("-inf")
    assert torch.equal(apply_bitmask(logits, bitmask), expected)


@pytest.mark.parametrize("path", ["mask-first", "check-then-mask"])
def test_sampler_masks_only_the_constrained_rows(compiler, tiny, path):
    torch.manual_seed(0)
    vocab_size = tiny.model.lm_head.out_features
    logits = torch.randn(4, vocab_size)
    truncate = {"top_p": 0.9} if path == "mask-first" else {}
    rows = [SamplingRow(SamplingParams(temperature=t, **truncate), [1], [], None, [], matcher)
            for t, matcher in [(0.0, None), (0.0, compiler.matcher(DIGITS)), (1.0, None), (1.0, compiler.matcher(DIGITS))]]
    if path == "mask-first":
        bitmask = compiler.fill_bitmask([r.grammar if needs_mask_first(r.params) else None for r in rows], vocab_size)
        out = Sampler()(logits, rows, bitmask, compiler)
    else:
        assert not any(needs_mask_first(r.params) for r in rows)
        out = Sampler()(logits, rows, None, compiler)
    assert out.token_ids[0] == logits[0].argmax()
    for i in (1, 3):
        assert re.fullmatch("[0-9]+", tiny.tokenizer.decode([int(out.token_ids[i])]))
    free = Sampler()(logits[:1], rows[:1])
    assert free.token_ids[0] == out.token_ids[0]


def test_check_then_mask_draws_from_the_masked_distribution(compiler, tiny):
    """Rejection sampling: an unmasked draw kept when allowed, a masked redraw otherwise, gives
    the masked distribution (here: over 'yes'/'no'-prefix tokens, most mass outside them)."""
    vocab_size = tiny.model.lm_head.out_features
    spec = GrammarSpec("choice", json.dumps(["yes", "no"]))
    allowed_mask = apply_bitmask(torch.zeros(1, vocab_size), compiler.fill_bitmask([compiler.matcher(spec)], vocab_size))[0]
    allowed = torch.nonzero(allowed_mask == 0).flatten()
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(vocab_size, generator=gen) * 0.5
    others = logits.exp().sum() - logits[allowed].exp().sum()
    offset = torch.log(others / len(allowed) / 2)  # the allowed tokens hold about a third of the mass
    logits[allowed] = offset + torch.linspace(-1.0, 1.0, len(allowed))
    expected = logits[allowed].softmax(-1)
    for seed, masked_first in [(2, False), (3, True)]:
        torch.manual_seed(seed)
        tokens = []
        for _ in range(10):  # 10 x 300 draws, batched (a (300, V) float32 batch is 180 MB)
            rows = [SamplingRow(SamplingParams(temperature=1.0), [1], [], None, [], compiler.matcher(spec)) for _ in range(300)]
            bitmask = compiler.fill_bitmask([r.grammar for r in rows], vocab_size) if masked_first else None
            tokens.append(Sampler()(logits.expand(300, -1), rows, bitmask, None if masked_first else compiler).token_ids)
        tokens = torch.cat(tokens)
        assert set(tokens.tolist()) <= set(allowed.tolist())
        freq = torch.stack([(tokens == t).float().mean() for t in allowed])
        assert (freq - expected).abs().max() < 0.03, (masked_first, freq, expected)


def _constrained(spec: GrammarSpec, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=40, grammar=spec, **kw)


def test_engine_n_choices_preemption_and_aborts_with_grammars(tiny):
    """Every choice owns its matcher; a preempted, recomputed sequence keeps its grammar state
    (greedy output equals a roomy run); aborting mid-grammar leaks no block."""
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(30 + i)] for i in range(8)]
    outputs = []
    for num_blocks in (256, 24):  # 24 blocks of 4 cannot hold 8 growing sequences: preemption
        engine = Engine(tiny, EngineConfig(num_kv_blocks=num_blocks, block_size=4, max_num_seqs=8))
        results = engine.generate(prompts, _constrained(spec, temperature=0.0))
        outputs.append([r[0].text for r in results])
        if num_blocks == 24:
            assert engine.scheduler.num_preemptions > 0
    assert outputs[0] == outputs[1]
    for text in outputs[0]:
        obj = json.loads(text)
        assert set(obj) == {"n", "tags"} and set(obj["tags"]) <= {"x", "y"}

    engine = Engine(tiny, EngineConfig(num_kv_blocks=128, block_size=4))
    (choices,) = engine.generate([prompts[0]], _constrained(DIGITS, n=3, temperature=1.0, seed=5))
    assert all(re.fullmatch("[0-9]{2,6}", c.text) for c in choices)
    engine.add_request("doomed", prompts[1], _constrained(spec, temperature=1.0))
    for _ in range(3):
        engine.step()
    engine.abort("doomed")
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == 128 and not engine.requests
