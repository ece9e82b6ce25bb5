"""EngineThread: the one thread of a server that runs torch: it loads the model, builds the
Engine and then runs the engine loop (AsyncEngine).

Why one thread for all three: OpenMP, which runs torch's and the CPU kernels' intra-op threads,
keeps a team of worker threads for every thread that starts a parallel region. A model loaded on
one thread (asyncio's executor) and stepped on another leaves two teams alive, and once libgomp
counts more of its threads than cores it stops spin-waiting between parallel regions: every one
of a step's ~60 parallel regions (a GPT-2 decode step) then waits for a futex wake-up. On 2 cores
that made a 10.5 ms batch-1 step take 13.5-15 ms in the server and nowhere else.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class EngineThread:
    """A daemon thread that runs the calls submitted to it, one at a time, in order."""

    def __init__(self, name: str = "engine-loop"):
        self._calls: queue.SimpleQueue[tuple[Future, Callable, tuple] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue fn(*args); its result (or exception) arrives in the returned future.
        RuntimeError once closed: the call would never run."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("this EngineThread is closed")
            self._calls.put((future, fn, args))
        return future

    def close(self) -> None:
        """Take no more calls; the thread ends once those queued so far have run."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._calls.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (after close); whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
