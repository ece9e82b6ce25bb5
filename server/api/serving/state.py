"""ServingState: everything the routes reach once the model is loaded, kept on app.state."""
from __future__ import annotations

from dataclasses import dataclass

from server.api.serving.chat import ChatServing
from server.api.serving.completions import CompletionServing
from server.api.serving.tokens import TokenServing
from server.engine.async_engine import AsyncEngine


@dataclass
class ServingState:
    async_engine: AsyncEngine
    completions: CompletionServing
    chat: ChatServing
    tokens: TokenServing

    @classmethod
    def create(cls, async_engine: AsyncEngine, model_name: str) -> ServingState:
        return cls(async_engine, CompletionServing(async_engine, model_name),
                   ChatServing(async_engine, model_name), TokenServing(async_engine, model_name))
