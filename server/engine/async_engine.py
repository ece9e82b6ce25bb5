"""AsyncEngine: the bridge between async HTTP handlers and the single-threaded Engine.

    event loop (HTTP handlers)                       engine thread (owns the Engine)
    ---------------------------                      ----------------------------------
    add()   -- inbox under a Condition ------------>  engine.add_request() per prompt
            <-- ack future, call_soon_threadsafe ---  accepted, or RequestRejected/ValueError
    stream  <-- deltas, call_soon_threadsafe -------  engine.step() -> ChoiceDeltas
    abort() -- inbox under a Condition ------------>  engine.abort()

One thread owns the Engine; handlers never touch engine state. It is an EngineThread, which the
server also loads the model on (engine_thread.py says why torch wants a single thread). Each
HTTP request gets one asyncio.Queue (in its RequestStream); the thread hands a whole step's
deltas to the loop with a single `call_soon_threadsafe`. With nothing to do the thread sleeps
on the Condition (no busy spin). If the thread dies, every open stream and pending add gets
EngineDeadError and `is_healthy` turns False.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

from server.engine.engine import Engine
from server.engine.engine_thread import EngineThread
from server.engine.outputs import ChoiceDelta, StepStats
from server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

StepObserver = Callable[[StepStats], None]


class EngineDeadError(RuntimeError):
    """The engine loop is gone (crashed or shut down); the request cannot complete."""


class QueueFullError(RuntimeError):
    """`max_queue` requests are already waiting; the client should retry later."""


class RequestStream:
    """The deltas of one HTTP request: one engine request per prompt, each with n choices.

    `async for prompt_index, delta in stream` ends once every choice has finished. Call
    `close()` in a `finally`: it aborts whatever has not finished (a client that went away).
    """

    def __init__(self, owner: AsyncEngine, request_ids: list[str], num_choices: int):
        self._owner = owner
        self.request_ids = request_ids
        self._prompt_index = {rid: i for i, rid in enumerate(request_ids)}
        self._num_unfinished = len(request_ids) * num_choices
        self._queue: asyncio.Queue[ChoiceDelta | BaseException] = asyncio.Queue()
        self._error: BaseException | None = None

    def put(self, item: ChoiceDelta | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, ChoiceDelta]:
        if self._error is not None:
            raise self._error
        if self._num_unfinished == 0:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        if item.finished:
            self._num_unfinished -= 1
        return self._prompt_index[item.request_id], item

    def close(self) -> None:
        if self._num_unfinished and self._error is None:
            self._owner.abort(self.request_ids)
        self._owner.forget(self.request_ids)


@dataclass
class _Add:
    request_ids: list[str]
    prompts: list[list[int]]
    params: SamplingParams
    arrival_time: float
    ack: asyncio.Future


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, observers: list[StepObserver] = ()):
        self.engine = engine
        self.max_queue = max_queue
        self._observers = list(observers)
        self._cond = threading.Condition()
        self._adds: list[_Add] = []          # guarded by _cond, like the four below
        self._aborts: list[str] = []
        self._num_adding = 0                 # requests the thread took from the inbox
        self._num_waiting = 0                # requests waiting in the scheduler, last known
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}   # event-loop thread only
        self._acks: set[asyncio.Future] = set()        # event-loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: EngineThread | None = None
        self._running: Future | None = None  # the engine loop, on self._thread
        self.error: BaseException | None = None

    # ---- event-loop side ------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return (self.error is None and self.engine.failure is None
                and self._running is not None and not self._running.done())

    @property
    def failure(self) -> str:
        """Why the engine is not healthy, for /health."""
        return self.engine.failure or f"the engine loop is not running: {self.error!r}"

    def start(self, thread: EngineThread | None = None) -> None:
        """Run the engine loop on `thread` (the one that built the engine; a new one if None);
        call from the event loop that will consume the streams. The thread is closed at once: it
        takes no other call and ends when the loop returns."""
        self._loop = asyncio.get_running_loop()
        self._thread = thread or EngineThread()
        self._running = self._thread.submit(self._run)
        self._thread.close()

    async def shutdown(self) -> None:
        """Abort every open request, stop the thread and wait for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._running is not None:
            await asyncio.wrap_future(self._running)

    async def add(self, request_id: str, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        """Queue one engine request per prompt, all or none.

        Args:
            request_id: unique; engine requests are named `{request_id}-{prompt index}`.
            prompts: token ids of each prompt.
            params: shared by every prompt (copied per prompt; the engine fills max_tokens).
        Returns:
            The stream of their deltas, once the engine thread accepted them.
        Raises:
            QueueFullError: max_queue requests are waiting already.
            EngineDeadError: the engine loop died or the server is shutting down.
            ValueError: the engine rejected a prompt (RequestRejected: too long).
        """
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        ack = self._loop.create_future()
        with self._cond:
            if self.error is not None or self._stopping or self.engine.failure is not None:
                raise EngineDeadError("the engine is not running (shutting down or crashed)")
            if self._num_queued() >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._adds.append(_Add(ids, prompts, params, time.monotonic(), ack))
            self._cond.notify()
        stream = RequestStream(self, ids, params.n)
        self._streams.update(dict.fromkeys(ids, stream))
        self._acks.add(ack)
        try:
            await ack
        except asyncio.CancelledError:   # the client left before the thread took the request
            stream.close()
            raise
        except BaseException:
            self.forget(ids)
            raise
        finally:
            self._acks.discard(ack)
        return stream

    def abort(self, request_ids: list[str]) -> None:
        with self._cond:
            self._aborts.extend(request_ids)
            self._cond.notify()

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)

    def _num_queued(self) -> int:
        return sum(len(a.request_ids) for a in self._adds) + self._num_adding + self._num_waiting

    def _dispatch(self, deltas: list[ChoiceDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put(delta)

    def _fail_all(self, error: EngineDeadError) -> None:
        for ack in self._acks:
            if not ack.done():
                ack.set_exception(error)
        for stream in set(self._streams.values()):
            stream.put(error)

    # ---- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self.engine.built_on_thread != threading.get_ident():
            log.warning("the engine loop runs on another thread than the one that built the engine: "
                        "OpenMP keeps a team of workers for each, and steps can be slower (engine_thread.py)")
        try:
            while self._run_once():
                pass
        except BaseException as exc:  # noqa: BLE001 - anything here must fail requests loudly
            log.exception("engine loop died")
            self.error = exc
            with self._cond:
                self._stopping = True
            self._call(self._fail_all, EngineDeadError(f"the engine loop died: {self.engine.failure or repr(exc)}"))

    def _run_once(self) -> bool:
        """One round: take the inbox, apply it, run one step. Returns False when stopped."""
        adds, aborts, stopping = self._take_work()
        for add in adds:
            self._admit(add)
        for rid in aborts:
            self.engine.abort(rid)
        if stopping:
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
        self._update_waiting()
        if self.engine.has_unfinished():
            deltas, stats = self.engine.step()
            self._update_waiting()
            self._observe(stats)  # before the deltas: a client that got its answer sees metrics
            if deltas:
                self._call(self._dispatch, deltas)
        return not (stopping and not self.engine.has_unfinished())

    def _take_work(self) -> tuple[list[_Add], list[str], bool]:
        with self._cond:
            while not (self._adds or self._aborts or self._stopping or self.engine.has_unfinished()):
                self._cond.wait()
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
            self._num_adding = sum(len(a.request_ids) for a in adds)
            return adds, aborts, self._stopping

    def _admit(self, add: _Add) -> None:
        added: list[str] = []
        try:
            for rid, prompt in zip(add.request_ids, add.prompts):
                params = replace(add.params, stop=list(add.params.stop),
                                 stop_token_ids=list(add.params.stop_token_ids))
                self.engine.add_request(rid, prompt, params, add.arrival_time)
                added.append(rid)
        except ValueError as exc:   # RequestRejected included: all prompts or none
            for rid in added:
                self.engine.abort(rid)
            self._call(_resolve, add.ack, exc)
            return
        self._call(_resolve, add.ack, None)

    def _update_waiting(self) -> None:
        waiting = len({seq.request_id for seq in self.engine.scheduler.waiting})
        with self._cond:
            self._num_waiting, self._num_adding = waiting, 0

    def _observe(self, stats: StepStats) -> None:
        for observer in self._observers:
            try:
                observer(stats)
            except Exception:  # a metrics bug must not stop generation
                log.exception("step observer %r failed", observer)

    def _call(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _resolve(ack: asyncio.Future, error: BaseException | None) -> None:
    if ack.done():
        return
    if error is None:
        ack.set_result(None)
    else:
        ack.set_exception(error)
