"""build_app(): the FastAPI app, its middleware and error handlers, and the lifespan that owns
the engine (loads the model in the background unless one is injected, starts and stops the
AsyncEngine thread)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager

from fastapi import FastAPI

from models.loader import ModelLoadError, load_model
from server.api import __version__
from server.api.errors import add_error_handlers
from server.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from server.api.routes import router
from server.api.server_config import ServerConfig
from server.api.serving.state import ServingState
from server.engine.async_engine import AsyncEngine
from server.engine.engine import Engine
from server.engine.engine_thread import EngineThread
from server.metrics import Metrics
from server.stats_logger import StatsLogger

log = logging.getLogger(__name__)


def build_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The app for `config`. Args: engine: an Engine to serve (tests); None loads config.model."""
    app = FastAPI(title="nanoserve", version=__version__, lifespan=_lifespan(config, engine),
                  description="OpenAI-compatible completions and chat completions.")
    app.state.config = config
    app.state.metrics = Metrics(config.model_name)
    app.state.serving = None          # ServingState once the engine runs
    app.state.draining = False        # set on SIGTERM: refuse new work, finish the rest
    app.state.load_error = None
    app.state.fatal_error = None      # set when the engine can never step again (a worker died)
    app.state.on_fatal: Callable[[], None] | None = None
    add_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)  # outermost: checked first
    return app


def _lifespan(config: ServerConfig, engine: Engine | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:  # built by the caller, on its thread: AsyncEngine warns about that
            _start_serving(app, engine)
            loading = None
        else:  # load in the background so /health can say 503 meanwhile
            loading = asyncio.create_task(_load_and_serve(app, config))
        try:
            yield
        finally:
            if loading is not None:
                loading.cancel()
                await asyncio.gather(loading, return_exceptions=True)
            if app.state.serving is not None:
                await app.state.serving.async_engine.shutdown()
                await asyncio.to_thread(app.state.serving.async_engine.engine.close)  # tensor-parallel workers
                log.info("engine stopped")

    return lifespan


async def _load_and_serve(app: FastAPI, config: ServerConfig) -> None:
    thread = EngineThread()  # loads the model, then runs the engine loop (engine_thread.py: why one)
    building = thread.submit(_build_engine, config)
    try:
        engine = await asyncio.wrap_future(building)
    except asyncio.CancelledError:  # the server stops while loading: close what the load still builds
        building.add_done_callback(_close_if_built)
        thread.close()
        raise
    except Exception as error:  # noqa: BLE001 - report and stop the server, do not hang at 503
        if isinstance(error, ModelLoadError):
            log.error("%s", error)
        else:
            log.exception("could not load model %r", config.model)
        app.state.load_error = error
        if app.state.on_fatal is not None:
            app.state.on_fatal()
        thread.close()
        return
    _start_serving(app, engine, thread)


def _close_if_built(building: Future) -> None:
    if not building.cancelled() and building.exception() is None:
        building.result().close()  # tensor-parallel workers, shared memory


def _build_engine(config: ServerConfig) -> Engine:
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, overrides=config.overrides)
    try:
        return Engine(loaded, config.engine)
    except ValueError as error:  # settings this model cannot run with (a KV pool too small, an uneven TP split)
        raise ModelLoadError(f"cannot serve {config.model!r}: {error}") from error


def _fail(app: FastAPI, reason: str) -> None:
    """From the tensor-parallel monitor thread: /health turns 503 (engine.failure), the server
    stops and exits non-zero."""
    app.state.fatal_error = reason
    if app.state.on_fatal is not None:
        app.state.on_fatal()


def _start_serving(app: FastAPI, engine: Engine, thread: EngineThread | None = None) -> None:
    config: ServerConfig = app.state.config
    metrics: Metrics = app.state.metrics
    loaded = engine.loaded
    metrics.set_build_info(__version__, loaded.name, str(loaded.dtype).removeprefix("torch."), str(loaded.device))
    async_engine = AsyncEngine(engine, config.max_queue, [metrics.observe_step, StatsLogger()])
    async_engine.start(thread)
    if engine.workers is not None:
        engine.workers.on_failure.append(lambda reason: _fail(app, reason))
        if engine.failure is not None:  # a worker died before the callback was in place
            _fail(app, engine.failure)
    app.state.serving = ServingState.create(async_engine, config.model_name)
    log.info("serving %s as %r (max_model_len %d)", loaded.name, config.model_name, engine.max_model_len)
