"""Load scenarios: what each simulated request asks for, drawn from seeded length distributions.

A scenario names a prompt shape and two length distributions (prompt and output tokens). Lengths
follow vLLM's "random dataset" convention: uniform in `mean * [1 - range_ratio, 1 + range_ratio]`,
so `range_ratio=0` gives fixed lengths (add `ignore_eos` to make the output length exact).

    short_chat       a short question, a short answer (the default)
    long_prompt      a prompt near the context limit, a short answer (prefill-bound)
    long_generation  a short prompt, a long answer (decode-bound)
    shared_prefix    one long system prompt shared by every request + a short question
                     (prefix-cache friendly: only the question is prefilled after the first)
    rewrite          "rewrite this passage" over real English paragraphs, an answer that
                     repeats much of its prompt (where speculative n-gram lookup pays)
    mixed            all of the above, weighted 4 : 1 : 1 : 2 : 1

Prompts are random common English words (rewrite: paragraphs of the essay on heaps that ships
with Python as `heapq.__about__`); most words are one token in GPT-2 and Llama-style BPE
vocabularies, and the Locust users calibrate the ratio against the server's `/tokenize` once.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

# Common short words: each is one BPE token (with its leading space) in the vocabularies we serve.
WORDS = (
    "the of and to in is was for on are with as at be by this had not but from or have an they which "
    "one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first "
    "any my now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used "
    "take three city house water light story river music table window garden paper money night friend"
).split()

SCENARIOS = ("short_chat", "long_prompt", "long_generation", "shared_prefix", "rewrite")
SCENARIO_WEIGHTS = {"short_chat": 4, "long_prompt": 1, "long_generation": 1, "shared_prefix": 2, "rewrite": 1}
REWRITE_INSTRUCTION = "Rewrite the following text, keeping its wording and fixing any typos:\n\n"
# Real English prose, on disk with every Python: the paragraphs (40+ words) of heapq's essay.
REWRITE_PASSAGES = tuple(" ".join(p.split()) for p in heapq.__about__.split("\n\n") if len(p.split()) >= 40)
SHARED_PREFIX_TOKENS = 512     # the system prompt every shared_prefix request repeats
CHAT_TEMPLATE_MARGIN = 64      # tokens a chat template may add around the messages


@dataclass(frozen=True)
class LengthDist:
    """Uniform integer lengths in mean * [1 - range_ratio, 1 + range_ratio], at least 1."""

    mean: int
    range_ratio: float = 0.5

    def sample(self, rng: random.Random) -> int:
        low = max(1, round(self.mean * (1 - self.range_ratio)))
        high = max(low, round(self.mean * (1 + self.range_ratio)))
        return rng.randint(low, high)


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: the prompt text (and optional shared system prompt) and max_tokens."""

    scenario: str
    system: str | None
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Scenario:
    name: str
    prompt: LengthDist
    output: LengthDist
    shared_prefix_tokens: int = 0


def build_scenario(name: str, context_len: int, prompt_tokens: int | None = None,
                   output_tokens: int | None = None, range_ratio: float | None = None) -> Scenario:
    """The scenario's length distributions for a server with `context_len` tokens of context.

    `prompt_tokens` / `output_tokens` / `range_ratio` override the scenario's defaults.
    """
    defaults = {
        "short_chat": (64, 64, 0.5),
        "long_generation": (32, min(512, context_len // 2), 0.25),
        "shared_prefix": (32, 64, 0.5),
        "rewrite": (0, 256, 0.0),       # the prompt is a passage; the answer ends at EOS
    }
    if name == "long_prompt":
        out = output_tokens or 32
        # ~90% of what is left after the answer and a chat template, minus the +10% spread.
        room = context_len - out - CHAT_TEMPLATE_MARGIN
        defaults["long_prompt"] = (max(16, int(room * 0.9 / 1.1)), out, 0.1)
    if name not in defaults:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)} or mixed")
    prompt_mean, output_mean, ratio = defaults[name]
    ratio = ratio if range_ratio is None else range_ratio
    shared = SHARED_PREFIX_TOKENS if name == "shared_prefix" else 0
    return Scenario(name, LengthDist(prompt_tokens or prompt_mean, ratio),
                    LengthDist(output_tokens or output_mean, ratio), shared)


def make_text(rng: random.Random, num_tokens: int, tokens_per_word: float = 1.0) -> str:
    """About `num_tokens` tokens of random words."""
    num_words = max(1, round(num_tokens / tokens_per_word))
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def shared_system_prompt(seed: int, tokens_per_word: float = 1.0) -> str:
    """The same system prompt for every user of a run (seeded by the run seed only)."""
    return "You are a helpful assistant. " + make_text(random.Random(seed), SHARED_PREFIX_TOKENS, tokens_per_word)


def draw_request(scenario: Scenario, rng: random.Random, seed: int, tokens_per_word: float = 1.0) -> RequestSpec:
    """Draw one request's prompt and max_tokens from the scenario's distributions."""
    system = shared_system_prompt(seed, tokens_per_word) if scenario.shared_prefix_tokens else None
    if scenario.name == "rewrite":
        return RequestSpec(scenario.name, None, REWRITE_INSTRUCTION + rng.choice(REWRITE_PASSAGES),
                           scenario.output.sample(rng))
    prompt = make_text(rng, scenario.prompt.sample(rng), tokens_per_word)
    return RequestSpec(scenario.name, system, prompt, scenario.output.sample(rng))
