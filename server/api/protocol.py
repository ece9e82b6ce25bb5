"""OpenAI request schemas (pydantic): they own validation and the conversion to SamplingParams.

Ranges follow OpenAI's API (penalties in [-2, 2], temperature in [0, 2], n up to 128, ...);
anything out of range is a 400 before it reaches the engine. A field nanoserve does not
implement is a 400 that names it (as OpenAI answers an unrecognized argument), except the
harmless ones in IGNORED_FIELDS and unimplemented fields sent with their no-op default
(`logit_bias: {}`, `best_of: 1`, ...). The vLLM-style extras `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids` and the structured-output
fields (server/api/structured_output.py) are accepted on both generation routes, and so is
nanoserve's `speculative: false`, which opts a request out of the server's speculative decoding.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.structured_output import GuidedFields, ResponseFormat, response_format_grammar
from server.api.tool_format import forced_call_grammar
from server.api.tool_protocol import ToolCall, ToolChoice, ToolDefinition
from server.engine.sampling_params import MAX_TOP_LOGPROBS, GrammarSpec, SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Accepted and ignored: bookkeeping fields that cannot change the output.
IGNORED_FIELDS = frozenset({"user", "store", "metadata", "service_tier", "prompt_cache_key",
                            "safety_identifier"})
# Not implemented, but harmless when sent with these values (clients send them by default).
NO_OP_VALUES: dict[str, tuple] = {
    "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "functions": (None, []),
    "function_call": (None, "none", "auto"), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
    "verbosity": (None,),
    # SGLang-style fields that sglang-router / vllm-router add to every request, at the values
    # that mean what nanoserve does anyway (trim stop strings, skip special tokens in the text,
    # no hidden states, no reasoning parser)
    "no_stop_trim": (False,), "skip_special_tokens": (True,), "return_hidden_states": (False,),
    "continue_final_message": (False,), "separate_reasoning": (True,), "stream_reasoning": (True,),
    "include_reasoning": (True,),
}


class OpenAIModel(BaseModel):
    # allow_inf_nan=False: Python's json accepts NaN and 1e999, which must be 400s, not math.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        # JSON may carry "\ud800", a lone surrogate: a str Python holds but cannot encode.
        if _has_lone_surrogate(value):
            raise ValueError("text contains a lone UTF-16 surrogate, which is not valid Unicode")
        return value


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    return isinstance(value, list) and any(_has_lone_surrogate(v) for v in value)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(GuidedFields, OpenAIModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None                      # None: the served model
    n: int = Field(1, ge=1, le=128)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - 128)  # + choice index must fit
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    speculative: bool = True                      # False: no speculative decoding for this request
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored_fields(cls, data: Any) -> Any:
        """Drop IGNORED_FIELDS and no-op values of unimplemented fields; the rest are 400s."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if key in cls.model_fields or not (key in IGNORED_FIELDS or
                                                   (key in NO_OP_VALUES and value in NO_OP_VALUES[key]))}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @cached_property
    def constraint(self) -> tuple[str, GrammarSpec] | None:
        """(field, spec) of the one output constraint, if any (built once per request). Raises
        ValueError for several."""
        found = self.grammars()
        if len(found) > 1:
            raise ValueError("give at most one output constraint; this request sets "
                             + ", ".join(param for param, _ in found))
        return found[0] if found else None

    def grammars(self) -> list[tuple[str, GrammarSpec]]:
        return self.guided_grammars()

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ValueError (a 400) for combinations SamplingParams rejects."""
        constraint = self.constraint
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            grammar=constraint[1] if constraint else None, speculative=self.speculative,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if self.prompt == [] or self.prompt == "":
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: one entry per prompt, text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        # Echo with logprobs scores the prompt too (with max_tokens 0: only the prompt).
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None   # assistant messages that called tools
    tool_call_id: str | None = None            # tool messages: the call they answer

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    @property
    def text(self) -> str:
        """The content as one string; text parts joined."""
        content = self.content or ""
        return "".join(part.text for part in content) if isinstance(content, list) else content

    def to_template_dict(self) -> dict:
        """The dict chat templates expect: role, content, and tool calls / tool_call_id if any."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [call.to_template_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)             # deprecated by OpenAI, still common
    max_completion_tokens: int | None = Field(None, ge=1)  # None (both): up to the context
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None      # None: "auto" with tools, "none" without
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: function names must be unique")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice: needs tools to choose from")
        named = getattr(self.tool_choice, "function", None)
        if named is not None and named.name not in names:
            raise ValueError(f"tool_choice: no tool named {named.name!r} in tools")
        return self

    @property
    def effective_tool_choice(self) -> str | ToolChoice:
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    @property
    def active_tools(self) -> list[ToolDefinition]:
        """The tools the model sees: none with tool_choice "none", only the named one if named."""
        choice = self.effective_tool_choice
        if choice == "none" or not self.tools:
            return []
        if isinstance(choice, str):
            return list(self.tools)
        return [t for t in self.tools if t.function.name == choice.function.name]

    def grammars(self) -> list[tuple[str, GrammarSpec]]:
        found = self.guided_grammars()
        response_format = response_format_grammar(self.response_format)
        if response_format is not None:
            found.append(response_format)
        choice = self.effective_tool_choice
        if choice not in ("none", "auto"):  # "required" or a named function (exactly one call)
            parallel = choice == "required" and self.parallel_tool_calls
            found.append(("tool_choice", forced_call_grammar(self.active_tools, parallel)))
        return found

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True   # prompts only; chat templates carry their own

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int


class TokenizerInfoResponse(BaseModel):
    """GET /tokenizer_info, shaped like vLLM's: lm-evaluation-harness reads the special tokens
    (and the chat template) from it, then tokenizes through /tokenize."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None      # always present, null when the vocabulary has none
    add_bos_token: bool        # whether /tokenize with add_special_tokens prepends bos_token
    chat_template: str | None
    vocab_size: int
    model_max_length: int


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
