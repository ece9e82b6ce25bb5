"""Request fields that constrain the output, and their conversion to one GrammarSpec.

    response_format  {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}  (chat)
    structured_outputs {"json" | "regex" | "choice" | "grammar": ...}  (vLLM, both routes)
    guided_json | guided_regex | guided_choice | guided_grammar        (vLLM's older names)

A request may use at most one of them (tool_choice "required" or a named function is one too).
Whether the grammar compiles is checked by the engine's GrammarCompiler, which names the field.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.sampling_params import GrammarSpec

ANY_JSON_OBJECT = '{"type": "object"}'


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Fields):
    name: str = Field("response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | bool = Field(True, alias="schema")  # True: any JSON value
    strict: bool | None = None


class ResponseFormat(_Fields):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only then')
        return self


class StructuredOutputs(_Fields):
    json_spec: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [k for k in ("json_spec", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class GuidedFields(BaseModel):
    """The constraint fields shared by both generation routes."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    def guided_grammars(self) -> list[tuple[str, GrammarSpec]]:
        """(param, spec) for every constraint the request sets (the caller allows one)."""
        found = []
        if self.structured_outputs is not None:
            so = self.structured_outputs
            found.append(_one_of("structured_outputs", so.json_spec, so.regex, so.choice, so.grammar,
                                 so.json_object))
        for param, spec in [("guided_json", _json_spec(self.guided_json)),
                            ("guided_regex", _spec("regex", self.guided_regex)),
                            ("guided_choice", _choice_spec(self.guided_choice)),
                            ("guided_grammar", _spec("grammar", self.guided_grammar))]:
            if spec is not None:
                found.append((param, spec))
        return found


def response_format_grammar(response_format: ResponseFormat | None) -> tuple[str, GrammarSpec] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return "response_format", GrammarSpec("json_schema", ANY_JSON_OBJECT)
    schema = response_format.json_schema.json_schema
    return "response_format.json_schema.schema", GrammarSpec("json_schema", json.dumps(schema))


def _one_of(param: str, json_spec, regex, choice, grammar, json_object) -> tuple[str, GrammarSpec]:
    if json_object:
        return f"{param}.json_object", GrammarSpec("json_schema", ANY_JSON_OBJECT)
    for field, spec in [("json", _json_spec(json_spec)), ("regex", _spec("regex", regex)),
                        ("choice", _choice_spec(choice)), ("grammar", _spec("grammar", grammar))]:
        if spec is not None:
            return f"{param}.{field}", spec
    raise AssertionError("validated to hold exactly one")


def _spec(kind: str, value: str | None) -> GrammarSpec | None:
    return None if value is None else GrammarSpec(kind, value)


def _json_spec(schema: dict | str | None) -> GrammarSpec | None:
    if schema is None:
        return None
    return GrammarSpec("json_schema", schema if isinstance(schema, str) else json.dumps(schema))


def _choice_spec(choice: list[str] | None) -> GrammarSpec | None:
    return None if choice is None else GrammarSpec("choice", json.dumps(choice))
