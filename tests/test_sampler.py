"""Sampler tests on crafted logits, no model.

Support tests sample one row many times (as a batch of identical rows) and compare the set of
tokens seen with the set the truncation rules must keep; the kept tokens are given >= 5%
probability so 3,000 draws see every one of them.
"""
import math

import pytest
import torch

from server.engine.sampler import (Sampler, SamplingRow, apply_penalties, prompt_logprobs)
from server.engine.sampling_params import SamplingParams

PROBS = [0.4, 0.3, 0.2, 0.1]


def make_row(prompt=(), output=(), seed=None, stop_token_ids=(), **params) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), generator,
                       list(stop_token_ids))


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def seen_tokens(logits_row: torch.Tensor, num_draws: int = 3000, **params) -> set[int]:
    torch.manual_seed(0)
    logits = logits_row.expand(num_draws, -1)
    out = Sampler()(logits, [make_row(**params) for _ in range(num_draws)])
    return set(out.token_ids.tolist())


def test_greedy_is_argmax_whatever_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 100)
    rows = [make_row(temperature=0.0), make_row(temperature=0.8, top_p=0.5),
            make_row(temperature=0.0, logprobs=3), make_row(temperature=1.2, seed=3),
            make_row(temperature=0.0, top_k=5, min_p=0.2), make_row(temperature=1.0)]
    out = Sampler()(logits, rows)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (6,)
    expected = logits.argmax(dim=-1)
    for i in (0, 2, 4):
        assert out.token_ids[i] == expected[i]
    alone = Sampler()(logits[2:3], [rows[2]])
    assert alone.token_ids[0] == expected[2]


def test_top_k_one_is_greedy():
    logits = torch.tensor([0.0, 1.0, 3.0, 2.9, -1.0])
    assert seen_tokens(logits, num_draws=500, temperature=1.5, top_k=1) == {2}


@pytest.mark.parametrize("params, kept", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.6), {0, 1}),                 # 0.4 < 0.6 <= 0.4 + 0.3
    (dict(top_p=0.75), {0, 1, 2}),
    (dict(top_p=0.05), {0}),                   # the top token is always kept
    (dict(min_p=0.4), {0, 1, 2}),              # threshold 0.16
    (dict(top_k=3, top_p=0.7), {0, 1}),        # top_p sees 0.44, 0.33, 0.22 after top_k
    (dict(top_k=3, top_p=0.8), {0, 1, 2}),
    (dict(min_p=0.2), {0, 1, 2, 3}),           # threshold 0.08
    (dict(min_p=0.2, temperature=0.5), {0, 1, 2}),  # sharpened: 0.53, 0.30, 0.13, 0.03
    (dict(), {0, 1, 2, 3}),
])
def test_truncation_keeps_exactly_the_expected_support(params, kept):
    assert seen_tokens(log_probs(PROBS), **params) == kept


def test_sampled_frequencies_follow_the_truncated_distribution():
    torch.manual_seed(0)
    num_draws = 20000
    logits = log_probs(PROBS).expand(num_draws, -1)
    out = Sampler()(logits, [make_row(top_k=3) for _ in range(num_draws)])
    freq = torch.bincount(out.token_ids, minlength=4).float() / num_draws
    expected = torch.tensor([0.4, 0.3, 0.2, 0.0]) / 0.9
    assert torch.allclose(freq, expected, atol=0.02)


def test_greedy_ties_pick_the_lowest_token_id():
    logits = torch.zeros(3, 50_000, dtype=torch.bfloat16)
    logits[:, [40_000, 7, 123]] = 2.0
    out = Sampler()(logits, [make_row(temperature=0.0) for _ in range(3)])
    assert out.token_ids.tolist() == [7, 7, 7]


def test_penalties_give_exact_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0]])
    rows = [make_row(prompt=[0, 1], output=[3, 3, 1], repetition_penalty=2.0,
                     presence_penalty=0.5, frequency_penalty=0.25),
            make_row(prompt=[0, 1], output=[3, 3, 1])]
    out = apply_penalties(logits.clone(), rows)
    # repetition over prompt+output {0, 1, 3}: 2/2, -1*2, 3/2; then over the output only
    # (3 twice, 1 once): presence 0.5 each, frequency 0.25 per occurrence; 0 is prompt-only.
    expected = torch.tensor([1.0, -2.0 - 0.5 - 0.25, 0.5, 1.5 - 0.5 - 0.5, -2.0])
    assert torch.equal(out[0], expected)
    assert torch.equal(out[1], logits[1])


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    row = make_row(output=[0], temperature=0.0, frequency_penalty=0.2)
    assert Sampler()(logits, [row]).token_ids.tolist() == [1]


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 4.0]])
    early = make_row(output=[1], temperature=0.0, min_tokens=3, stop_token_ids=[2, 4])
    done = make_row(output=[1, 1, 1], temperature=0.0, min_tokens=3, stop_token_ids=[2, 4])
    assert Sampler()(logits, [early]).token_ids.tolist() == [3]
    assert Sampler()(logits, [done]).token_ids.tolist() == [2]
    sampled = seen_tokens(logits[0], num_draws=2000, output=[1], min_tokens=3,
                          stop_token_ids=[2, 4])
    assert sampled == {0, 1, 3}


def _seeded_tokens(logits: torch.Tensor, position: int, companions: list[SamplingRow],
                   steps: int = 5) -> list[int]:
    """Sample the seed-1234 row (row `position`'s logits) for several steps among companions."""
    row = make_row(seed=1234, temperature=0.9, top_p=0.95)
    rows = companions[:position] + [row] + companions[position:]
    return [Sampler()(logits, rows).token_ids[position].item() for _ in range(steps)]


def test_seeded_sampling_is_reproducible_in_any_batch():
    torch.manual_seed(7)
    target = torch.randn(1, 1000)
    others = torch.randn(3, 1000)
    alone = _seeded_tokens(target, 0, [])
    assert alone == _seeded_tokens(target, 0, [])
    assert len(set(alone)) > 1  # the generator advances between steps
    for position in (0, 3):
        companions = [make_row(), make_row(seed=99, top_k=20), make_row(temperature=0.0)]
        batch = torch.cat([others[:position], target, others[position:]])
        assert _seeded_tokens(batch, position, companions) == alone


def test_logprobs_come_from_the_raw_logits():
    torch.manual_seed(3)
    logits = torch.randn(3, 50).to(torch.bfloat16)
    rows = [make_row(logprobs=5, temperature=0.7, repetition_penalty=1.5, output=[1, 2]),
            make_row(logprobs=None),
            make_row(logprobs=2, temperature=0.0, presence_penalty=1.0, output=[7])]
    out = Sampler()(logits, rows)
    raw = logits.float().log_softmax(dim=-1)
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_token_ids.shape == (3, 5) and out.top_logprobs.shape == (3, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.allclose(out.top_logprobs, raw.gather(1, out.top_token_ids))
    assert torch.equal(out.top_token_ids[:, 0], raw.argmax(dim=-1))


def test_no_logprobs_requested_gives_none():
    out = Sampler()(torch.randn(2, 10), [make_row(), make_row(temperature=0.0)])
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


def test_logprobs_zero_gives_empty_top():
    out = Sampler()(torch.randn(2, 10), [make_row(logprobs=0), make_row()])
    assert out.logprobs.shape == (2,) and out.top_token_ids.shape == (2, 0)


def test_prompt_logprobs_match_direct_computation():
    torch.manual_seed(4)
    logits = torch.randn(6, 30, dtype=torch.float16)
    targets = torch.tensor([3, 0, 29, 7, 7, 12])
    target_lp, top_ids, top_lp = prompt_logprobs(logits, targets, k=4)
    direct = torch.log(torch.softmax(logits.double(), dim=-1)).float()
    assert torch.allclose(target_lp, direct[torch.arange(6), targets], atol=1e-5)
    assert top_ids.shape == (6, 4) and top_ids.dtype == torch.int64
    assert torch.allclose(top_lp, direct.gather(1, top_ids), atol=1e-5)
    assert torch.equal(top_ids, direct.topk(4, dim=-1).indices)


def test_large_mixed_batch_runs():
    torch.manual_seed(5)
    num_seqs, vocab_size, eos = 64, 50257, 50256
    rows = []
    for i in range(num_seqs):
        rows.append(make_row(
            prompt=list(range(i, i + 200)), output=list(range(i * 3)), seed=i if i % 3 else None,
            stop_token_ids=[eos, 13], temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
            top_k=[-1, 50, 1, 200][i // 4 % 4], top_p=[1.0, 0.9, 0.5][i % 3],
            min_p=[0.0, 0.05][i % 2], presence_penalty=0.5 * (i % 3 == 0),
            frequency_penalty=0.3 * (i % 5 == 0), repetition_penalty=[1.0, 1.2][i % 2],
            min_tokens=[0, 1000][i % 2], max_tokens=1000, logprobs=[None, 0, 5, 20][i % 4]))
    logits = torch.randn(num_seqs, vocab_size, dtype=torch.bfloat16)
    logits[:, eos] = 20.0  # EOS would win everywhere unless masked
    out = Sampler()(logits, rows)
    assert out.token_ids.shape == (num_seqs,) and out.top_logprobs.shape == (num_seqs, 20)
    assert torch.all((out.token_ids >= 0) & (out.token_ids < vocab_size))
    assert all(out.token_ids[i] != eos for i in range(1, num_seqs, 2))
    assert torch.isfinite(out.logprobs).all()


@pytest.mark.parametrize("vocab", [1, 7, 16, 17, 100, 50257])
def test_first_argmax_is_torch_argmax(vocab):
    """The C++ argmax (greedy's token, the exponential race's winner) gives torch.argmax's first
    maximum: ties inside a 16-lane vector, across lanes and in the tail, -inf masks, all -inf."""
    from models.cpu_kernels import can_build
    from server.engine.sampler import argmax_kernel, first_argmax

    assert argmax_kernel() is not None or not can_build()
    gen = torch.Generator().manual_seed(vocab)
    rows = torch.randn(12, vocab, generator=gen)
    rows[1] = rows[1].round()  # many ties at the maximum
    rows[2] = float("-inf")  # every token masked: index 0, as torch
    rows[3, : vocab // 2] = float("-inf")
    rows[4] = 0.0  # all tied
    rows[5, -1] = 100.0  # the maximum in the tail
    rows[6, [vocab // 3, vocab - 1]] = 100.0  # a tie between two lanes (or the tail)
    rows[7, [0, vocab // 2]] = 100.0
    rows[8] = torch.randint(0, 3, (vocab,), generator=gen).float()
    rows[9] = -rows[9].abs() - 1  # all negative
    assert torch.equal(first_argmax(rows), rows.argmax(dim=-1))
    assert torch.equal(first_argmax(rows[3:4]), rows[3:4].argmax(dim=-1))
    strided = rows.t().contiguous().t()  # a non-contiguous view of the same values
    assert torch.equal(first_argmax(strided), rows.argmax(dim=-1))
