"""The OpenAI-compatible HTTP API: app, routes, protocol, serving, server."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("nanoserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+local"
