"""OpenAI tool-calling request schemas: tool definitions, tool_choice, and the tool calls
that assistant messages carry back in a conversation."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


class _Fields(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Fields):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ToolDefinition(_Fields):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Fields):
    name: str


class NamedToolChoice(_Fields):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Fields):
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"arguments must be JSON text: {error}") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object")
        return value


class ToolCall(_Fields):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction

    def to_template_dict(self) -> dict:
        """The shape chat templates read: arguments as an object, not JSON text."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": json.loads(self.function.arguments)}}
