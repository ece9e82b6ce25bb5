"""Scheduler tests with fake sampled tokens: budgets, chunking, preemption, admission, leaks."""
from __future__ import annotations

import random

import pytest

from server.engine.kv_cache import BlockManager
from server.engine.scheduler import RequestRejected, Scheduler
from server.engine.step_plan import SchedulerOutput
from server.engine.sequence import FinishReason, Sequence, SequenceStatus
from tests.test_kv_cache import check_pool, make_seq

VOCAB = 50


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 32, max_model_len: int = 256) -> Scheduler:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len)


def next_state(prev: int, token_id: int) -> int:
    """The fake model's "K/V" of a token: depends on the token and everything before it."""
    return hash((prev, token_id)) & 0xFFFFFFFF


def reference_output(prompt: list[int], max_tokens: int, eos: int | None = 0) -> list[int]:
    """What the fake model generates with no cache, no batching, no preemption."""
    state, tokens, output = 0, list(prompt), []
    for token_id in tokens:
        state = next_state(state, token_id)
    while len(output) < max_tokens:
        output.append(state % VOCAB)
        if output[-1] == eos:
            break
        state = next_state(state, output[-1])
    return output


class FakeEngine:
    """schedule -> "run" (chained states through the slot pool) -> postprocess, like Engine.step.

    Reading the previous token's state through the block table means that a wrong prefix hit,
    a leaked or early-reused block would change the output against `reference_output`.
    """

    def __init__(self, scheduler: Scheduler, eos: int | None = 0) -> None:
        self.scheduler = scheduler
        self.eos = eos
        self.kv: dict[int, int] = {}
        self.outputs: list[SchedulerOutput] = []

    def slot(self, seq: Sequence, pos: int) -> int:
        block_size = self.scheduler.block_manager.block_size
        return seq.block_table[pos // block_size] * block_size + pos % block_size

    def step(self) -> SchedulerOutput:
        was_waiting = {id(seq) for seq in self.scheduler.waiting}
        out = self.scheduler.schedule()
        if out.preempted:                                # no admission in a step that preempts
            assert not any(id(chunk.seq) in was_waiting for chunk in out.chunks)
        sampled = []
        for chunk in out.chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            for pos in range(start, start + chunk.num_new_tokens):
                prev = self.kv[self.slot(seq, pos - 1)] if pos else 0
                self.kv[self.slot(seq, pos)] = next_state(prev, seq.token_ids[pos])
            if chunk.samples:
                sampled.append((seq, self.kv[self.slot(seq, start + chunk.num_new_tokens - 1)]))
        self.scheduler.update_after_step(out)
        for seq, state in sampled:
            seq.append_token(state % VOCAB)
            if seq.output_token_ids[-1] == self.eos:
                self.scheduler.finish(seq, FinishReason.STOP)
            elif seq.num_output_tokens >= seq.params.max_tokens:
                self.scheduler.finish(seq, FinishReason.LENGTH)
        self.outputs.append(out)
        return out

    def run_to_completion(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish: livelock?")


def chunk_sizes(out: SchedulerOutput) -> dict[int, int]:
    return {chunk.seq.seq_id: chunk.num_new_tokens for chunk in out.chunks}


def test_token_and_sequence_budgets():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    seqs = [make_seq(8) for _ in range(5)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert chunk_sizes(out) == {seqs[0].seq_id: 8, seqs[1].seq_id: 8, seqs[2].seq_id: 4}
    assert out.num_batched_tokens == 20 and sched.num_running == 3 and sched.num_waiting == 2
    assert [c.samples for c in out.chunks] == [True, True, False]


def test_decode_before_prefill_and_long_prompt_is_chunked():
    sched = make_scheduler(max_num_batched_tokens=16)
    engine = FakeEngine(sched, eos=None)
    short, long = make_seq(4, max_tokens=100), make_seq(list(range(1, 61)), max_tokens=1)
    sched.add(short)
    engine.step()                                    # short prefilled, now decoding
    sched.add(long)
    long_chunks = []
    while not long.is_finished:
        out = engine.step()
        assert out.chunks[0].seq is short and out.chunks[0].num_new_tokens == 1
        long_chunks.append((chunk_sizes(out)[long.seq_id], out.chunks[1].samples))
    assert long_chunks == [(15, False), (15, False), (15, False), (15, True)]
    assert short.num_output_tokens == 1 + len(long_chunks)   # a token every step


def test_preemption_newest_first_back_to_the_front_of_waiting():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    engine = FakeEngine(sched, eos=None)
    seqs = [make_seq([i + 1] * 8, max_tokens=12) for i in range(3)]   # 2 blocks each: full pool
    for seq in seqs:
        sched.add(seq)
    engine.step()
    out = engine.step()           # the decodes at position 8 need a 3rd block each
    assert out.preempted == [seqs[2]] and [c.seq for c in out.chunks] == seqs[:2]
    assert seqs[2].status is SequenceStatus.WAITING and seqs[2].num_computed_tokens == 0
    assert seqs[2].num_output_tokens == 1 and seqs[2].block_table == []
    while sched.num_preemptions < 2:                 # at position 12 seqs[0] needs a 4th
        out = engine.step()
    assert out.preempted == [seqs[1]] and seqs[1].num_preemptions == 1
    assert list(sched.waiting) == [seqs[1], seqs[2]]  # at the front, oldest first
    engine.run_to_completion()
    for seq in seqs:
        assert seq.num_tokens == 8 + 12
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 12, eos=None)
    check_pool(sched.block_manager, [])


def test_the_newest_seq_preempts_itself():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    engine = FakeEngine(sched, eos=None)
    old, new = make_seq([1] * 7, max_tokens=8), make_seq([2] * 8, max_tokens=8)
    sched.add(old)
    sched.add(new)
    engine.step()                 # 2 blocks each, pool full; old's next token fits its block
    out = engine.step()           # new needs a 3rd block and is itself the newest
    assert out.preempted == [new] and [c.seq for c in out.chunks] == [old]
    engine.run_to_completion()
    assert old.output_token_ids == reference_output(old.prompt_token_ids, 8, eos=None)
    assert new.output_token_ids == reference_output(new.prompt_token_ids, 8, eos=None)


def test_preempting_a_decode_already_scheduled_this_step_withdraws_its_chunk():
    sched = make_scheduler(num_blocks=3, block_size=4, max_num_batched_tokens=16)
    bm = sched.block_manager
    prefilling, decoding = make_seq(12), make_seq(3)
    for seq, num_computed in ((prefilling, 4), (decoding, 3)):   # hand-built running state
        bm.match_prefix(seq)
        bm.allocate(seq, num_computed)
        seq.num_computed_tokens = num_computed
        seq.status = SequenceStatus.RUNNING
        sched.running.append(seq)
    decoding.append_token(5)
    out = sched.schedule()        # decode scheduled in phase 1, then needed by the older prefill
    assert out.preempted == [decoding] and chunk_sizes(out) == {prefilling.seq_id: 8}
    assert out.num_batched_tokens == 8 and decoding.block_table == []
    check_pool(bm, sched.running)


def test_admission_errors_state_the_limit_and_the_numbers():
    sched = make_scheduler(num_blocks=64, block_size=16, max_model_len=2048)
    with pytest.raises(RequestRejected, match=r"maximum context length is 2048 tokens; the "
                       r"request has 2000 prompt tokens and max_tokens 100"):
        sched.add(make_seq(2000, max_tokens=100))
    with pytest.raises(RequestRejected, match=r"KV cache holds 1024 tokens \(64 blocks of 16\); "
                       r"the request has 1000 prompt tokens and max_tokens 100"):
        sched.add(make_seq(1000, max_tokens=100))
    with pytest.raises(RequestRejected, match=r"2049 prompt tokens$"):
        sched.add(make_seq(2049, max_tokens=None))
    sched.add(make_seq(1024, max_tokens=None))       # None: no extra tokens reserved
    assert sched.num_waiting == 1 and issubclass(RequestRejected, ValueError)


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(max_num_seqs=1)
    engine = FakeEngine(sched)
    running, waiting = make_seq(9, request_id="r"), make_seq(9, request_id="w")
    sched.add(running)
    sched.add(waiting)
    engine.step()
    assert sched.block_manager.usage > 0
    assert sched.abort("w") == [waiting] and sched.abort("r") == [running]
    assert sched.abort("nope") == [] and sched.abort("r") == []
    for seq in (running, waiting):
        assert seq.is_finished and seq.finish_reason is FinishReason.ABORT
    assert not sched.has_unfinished() and sched.block_manager.usage == 0.0
    assert sched.schedule().is_empty


def test_an_abort_inside_a_step_breaks_the_engine_invariant():
    """The engine applies aborts between steps only; one that slipped inside a step is a bug."""
    sched = make_scheduler()
    seq = make_seq(9, request_id="x")
    sched.add(seq)
    out = sched.schedule()
    sched.abort("x")
    assert seq.block_table == []
    with pytest.raises(AssertionError, match="between steps"):
        sched.update_after_step(out)


def test_shared_prefix_is_reused_and_counted():
    sched = make_scheduler(block_size=16, max_num_batched_tokens=256)
    engine = FakeEngine(sched)
    shared = list(range(1, 41))
    sched.add(make_seq(shared + [41], max_tokens=2))
    engine.run_to_completion()
    b = make_seq(shared + [99, 98], max_tokens=2)
    sched.add(b)
    out = engine.step()
    assert b.num_cached_tokens == 32 and chunk_sizes(out)[b.seq_id] == 10
    assert sched.block_manager.num_prefix_hit_tokens == 32
    engine.run_to_completion()
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2)


@pytest.mark.parametrize("seed", range(3))
def test_random_requests_finish_with_reference_outputs_and_no_leaks(seed):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=rng.choice([2, 4, 8]),
                           max_num_batched_tokens=rng.choice([8, 16, 64]), max_model_len=64)
    engine = FakeEngine(sched)
    stems = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(5)]
    seqs, aborted = [], set()
    for step in range(3000):
        if len(seqs) < 150 and rng.random() < 0.3:
            prompt = rng.choice(stems)[: rng.randrange(1, 31)] + [rng.randrange(1, VOCAB)]
            seq = make_seq(prompt, max_tokens=rng.randrange(1, 64 - len(prompt) + 1))
            try:
                sched.add(seq)
                seqs.append(seq)
            except RequestRejected:
                pass
        if seqs and rng.random() < 0.02:
            victim = rng.choice(seqs)
            aborted.update(s.seq_id for s in sched.abort(victim.request_id))
        if not sched.has_unfinished() and len(seqs) >= 150:
            break
        engine.step()
        check_pool(sched.block_manager, sched.running)
    engine.run_to_completion()
    assert sched.num_preemptions > 0 and sched.block_manager.num_prefix_hit_tokens > 0
    for seq in seqs:
        assert seq.is_finished
        if seq.seq_id not in aborted:
            assert seq.output_token_ids == reference_output(seq.prompt_token_ids,
                                                            seq.params.max_tokens)
    check_pool(sched.block_manager, [])
    assert sched.block_manager.num_free_blocks == 16 and sched.block_manager.usage == 0.0
