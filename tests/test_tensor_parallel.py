"""Tensor parallelism on this CPU: 2 gloo ranks (the test process + one spawned worker) against 1.

Every family, in float32 so that splitting a matmul's sum over two ranks changes nothing that
greedy decoding can see: same tokens, same prompt logprobs (to 1e-4) as one process, and as
transformers. Then the engine invariants under TP=2, and the server's life cycle: a killed
worker fails /health and exits non-zero, SIGTERM stops every rank.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import torch

from models.loader import load_model
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams
from server.engine.speculative import SpeculativeConfig
from tests.api_fixtures import ROOT, TINY_MODEL, free_port, run_server
from tests.test_engine import greedy, make_prompts

FAMILIES = [("tiny-gpt2", {}), ("tiny-qwen2", {}), ("tiny-qwen2", {"kv_heads": "1"}), ("tiny-qwen3", {}),
            ("tiny-qwen3-moe", {}), ("tiny-deepseek-v2", {}), ("tiny-deepseek-v3", {})]


def tp_engine(spec: str, tp: int, overrides: dict | None = None, **config) -> Engine:
    loaded = load_model(spec, dtype="float32", device="cpu", overrides=overrides)
    return Engine(loaded, EngineConfig(tensor_parallel_size=tp, block_size=4, **{"num_kv_blocks": 256, **config}))


def run_and_close(engine: Engine, prompts: list[list[int]], params: SamplingParams):
    try:
        return [choices[0] for choices in engine.generate(prompts, params)]
    finally:
        engine.close()


def scored(choice) -> list[float]:
    return [entry[0] for entry in choice.prompt_logprobs[1:]]


@pytest.mark.parametrize("preset,overrides", FAMILIES, ids=[p + "".join(f"-{k}{v}" for k, v in o.items()) for p, o in FAMILIES])
def test_tp2_equals_tp1(preset, overrides):
    prompts = make_prompts(5, seed=4)  # mixed lengths, shared prefixes, prefill chunked at 16 tokens
    params = greedy(8, prompt_logprobs=1)
    one = run_and_close(tp_engine(f"random:{preset}", 1, overrides, max_num_batched_tokens=16), prompts, params)
    two = run_and_close(tp_engine(f"random:{preset}", 2, overrides, max_num_batched_tokens=16), prompts, params)
    for a, b in zip(one, two):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(scored(b)), torch.tensor(scored(a)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_tp2_prompt_logprobs_match_transformers(hf_checkpoints, family):
    """A real checkpoint directory split over 2 ranks: the log-probability of every prompt
    token equals transformers' (GPT-2: tied head, vocab 50257 padded to split; Qwen2: biases)."""
    path, hf_model = hf_checkpoints[family]
    prompt = make_prompts(1, seed=7, shared_prefix=30)[0]
    (choice,) = run_and_close(tp_engine(str(path), 2), [prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))
    with torch.no_grad():
        logprobs = hf_model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # (T, V)
    expected = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    torch.testing.assert_close(torch.tensor(scored(choice)), expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tp1_outputs():
    prompts = make_prompts(6, seed=5)
    return prompts, [c.token_ids for c in run_and_close(tp_engine("random:tiny-qwen2", 1), prompts, greedy(12))]


@pytest.mark.parametrize("case", ["batch", "alone", "no-prefix-cache", "preemption", "ngram"])
def test_tp2_invariants(tp1_outputs, case):
    """Batching, prefix caching, preemption (recompute) and speculative verification (n-gram
    drafts: several logit rows per sequence) leave TP=2 greedy output unchanged."""
    prompts, expected = tp1_outputs
    config = {"enable_prefix_caching": case != "no-prefix-cache"}
    if case == "preemption":
        config.update(num_kv_blocks=24, max_num_seqs=6)  # 6 sequences need up to 36 blocks of 4
    if case == "ngram":
        config.update(speculative=SpeculativeConfig.parse("ngram", num_tokens=3, draft_num_layers=None, max_batch=8,
                                                          ngram_min=1, ngram_max=3))
    engine = tp_engine("random:tiny-qwen2", 2, **config)
    try:
        if case == "alone":
            got = [engine.generate([p], greedy(12))[0][0].token_ids for p in prompts]
        else:
            got = [choices[0].token_ids for choices in engine.generate(prompts, greedy(12))]
        assert got == expected
        if case == "preemption":
            assert engine.scheduler.num_preemptions > 0
        if case == "alone":  # one at a time: later prompts reuse the first one's cached prefix blocks
            assert engine.block_manager.num_prefix_hit_tokens > 0
        if case == "ngram":
            assert engine.proposer is not None
    finally:
        engine.close()


def test_tp2_abort_frees_blocks_and_the_pools_stay_consistent(tp1_outputs):
    """Blocks are owned by rank 0's block manager and the worker's pool is indexed by its
    tables: after aborts every block is free, and reusing them gives the TP=1 output again."""
    prompts, expected = tp1_outputs
    engine = tp_engine("random:tiny-qwen2", 2, num_kv_blocks=40, enable_prefix_caching=False)
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(40))
        for step in range(6):
            engine.step()
        for i in range(len(prompts)):
            engine.abort(f"r{i}")
        while engine.has_unfinished():
            engine.step()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert [c[0].token_ids for c in engine.generate(prompts, greedy(12))] == expected
    finally:
        engine.close()


def test_sizes_that_do_not_split_are_refused_before_anything_starts():
    loaded = load_model("random:tiny-gpt2", dtype="float32", device="cpu")  # 4 heads
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(ValueError, match="tensor-parallel size 3 must divide the model's 4 attention heads"):
        Engine(loaded, EngineConfig(tensor_parallel_size=3, num_kv_blocks=16))
    assert {p.pid for p in psutil.Process().children()} == before


def _worker(server) -> psutil.Process:
    """The server's one tensor-parallel worker (its other child is multiprocessing's resource tracker)."""
    (worker,) = [p for p in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    return worker


def test_server_with_a_killed_worker_turns_unhealthy_and_exits_nonzero():
    with run_server("--tensor-parallel-size", "2", "--dtype", "float32") as server:
        reply = server.openai().completions.create(model=TINY_MODEL, prompt="split me", max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens == 5
        assert httpx.get(server.url + "/server_info").json()["tp_size"] == 2
        worker = _worker(server)
        worker.kill()
        killed = time.monotonic()
        while time.monotonic() - killed < 10:
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code != 200:
                    break
            except httpx.TransportError:  # already exited: failing too
                break
            time.sleep(0.1)
        else:
            pytest.fail("/health still 200 ten seconds after the worker died")
        assert server.proc.wait(30) == 1
        assert f"tensor-parallel worker rank 1 (pid {worker.pid}) died with exit code -9" in server.log_tail(20000)


def test_sigterm_stops_every_rank():
    with run_server("--tensor-parallel-size", "2") as server:
        worker = _worker(server)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log_tail()
        worker.wait(10)
        assert not worker.is_running()
        assert "tensor parallel: workers stopped" in server.log_tail()


def test_serve_refuses_an_uneven_split_in_one_sentence():
    command = [sys.executable, "-m", "server", "--model", "random:tiny-gpt2", "--tensor-parallel-size", "3",
               "--port", str(free_port())]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "tensor-parallel size 3 must divide the model's 4 attention heads" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_second_engine_on_the_same_loaded_model_reuses_its_shards():
    """bench builds several engines from one loaded model: the second finds the weights cut
    already and must only point the collectives at its own workers (and still know V)."""
    loaded = load_model("random:tiny-qwen2", dtype="float32", device="cpu")
    outputs = []
    for _ in range(2):
        engine = Engine(loaded, EngineConfig(tensor_parallel_size=2, block_size=4, num_kv_blocks=64))
        assert engine.vocab_size == 151936
        outputs.append(run_and_close(engine, make_prompts(3, seed=9), greedy(6)))
    assert [c.token_ids for c in outputs[0]] == [c.token_ids for c in outputs[1]]
