"""EngineThread: one thread loads the model and runs the engine loop (server/engine/engine_thread.py)."""
from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from models.loader import load_model
from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine import Engine
from server.engine.engine_thread import EngineThread
from server.engine.sampling_params import SamplingParams
from tests.api_fixtures import TINY_MODEL

OTHER_THREAD = "runs on another thread than the one that built the engine"


def test_calls_run_in_order_on_one_thread_and_errors_reach_the_caller():
    thread = EngineThread("test-engine")
    seen = []
    futures = [thread.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i) for i in range(5)]
    failing = thread.submit(lambda: 1 / 0)
    assert [f.result(timeout=10) for f in futures] == list(range(5))
    assert seen == [(i, "test-engine") for i in range(5)]
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    thread.close()
    with pytest.raises(RuntimeError, match="closed"):
        thread.submit(print)  # would never run
    assert thread.join(timeout=10)


def _generate(build_on_engine_thread: bool) -> list[int]:
    """Greedy tokens of one request through AsyncEngine, the engine built on the main thread or
    (as the server does) on the thread that then runs the loop."""
    def build() -> Engine:
        return Engine(load_model(TINY_MODEL), EngineConfig(num_kv_blocks=64))

    async def run() -> list[int]:
        thread = EngineThread() if build_on_engine_thread else None
        engine = await asyncio.wrap_future(thread.submit(build)) if thread else build()
        async_engine = AsyncEngine(engine, max_queue=8)
        async_engine.start(thread)
        stream = await async_engine.add("r", [[1, 2, 3, 4]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        tokens = [t async for _, delta in stream for t in delta.token_ids]
        stream.close()
        assert async_engine.is_healthy
        await async_engine.shutdown()
        assert not async_engine.is_healthy and engine.block_manager.num_free_blocks == 64
        return tokens

    return asyncio.run(run())


def test_the_loop_runs_where_the_engine_was_built_and_warns_otherwise(caplog):
    with caplog.at_level(logging.WARNING, logger="server.engine.async_engine"):
        same_thread = _generate(build_on_engine_thread=True)
        assert OTHER_THREAD not in caplog.text
        main_thread = _generate(build_on_engine_thread=False)
        assert OTHER_THREAD in caplog.text
    assert len(same_thread) == 8 and same_thread == main_thread

