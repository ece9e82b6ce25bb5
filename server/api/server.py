"""`nanoserve serve`: build the app, run uvicorn, shut down gracefully on SIGTERM/SIGINT.

Graceful means: /health turns 503 and new generation requests get 503, uvicorn stops
listening and waits up to --shutdown-timeout for in-flight requests, cancels (= aborts) what is
left, then the lifespan stops the engine thread; the process exits 0.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.api.app import build_app
from server.api.server_config import server_config_from_args

log = logging.getLogger(__name__)


class _GracefulServer(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM after shutting down (exit status 143); we finish
    with status 0 instead, after telling the app to stop admitting work."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        log.info("received %s: finishing in-flight requests, admitting no new ones", signal.Signals(sig).name)
        self.app.state.draining = True
        self.should_exit = True


def serve(args: argparse.Namespace) -> int:
    """Run the HTTP server until a signal. Returns the process exit status."""
    try:
        config = server_config_from_args(args)
    except ValueError as error:  # inconsistent flags: one sentence, like argparse
        print(f"nanoserve serve: error: {error}", file=sys.stderr)
        return 2
    app = build_app(config)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=config.shutdown_timeout_s)
    server = _GracefulServer(uv_config, app)
    app.state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if app.state.load_error is not None or app.state.fatal_error is not None else 0
