"""Locust users for nanoserve's OpenAI endpoints, with TTFT and inter-token latency as their own entries.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000               # web UI on :8089
    locust -f loadtest/locustfile.py --host ... --headless -u 8 -r 8 -t 60s --scenario long_prompt

`ChatUser` posts to /v1/chat/completions, `CompletionUser` to /v1/completions (pick one by naming
it after the options). Each scenario is a task tagged with its name, so `--scenario NAME` and
`--tags NAME` select the same thing; `--scenario mixed` (or no tags) runs them all, weighted.

Each request reports up to three kinds of Locust entries under the name "<endpoint> [<scenario>]":

    POST  end-to-end latency; response_length = output tokens (the usage count), so Locust's
          "Average Content Size" column is the mean output length
    TTFT  time to the first text chunk (streamed requests)
    ITL   one entry per gap between text chunks (streamed requests)

A non-200 status, a broken stream, a missing [DONE] or usage chunk fails the POST entry with
the reason. `--samples-file` also appends every request as one JSON line (the sweep reads it).
"""
from __future__ import annotations

import itertools
import random
import threading

import gevent
import requests
from locust import User, between, constant, events, tag, task
from locust.env import Environment
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

from loadtest.client import RequestRecord, build_body, endpoint_for, send
from loadtest.scenarios import SCENARIO_WEIGHTS, SCENARIOS, build_scenario, draw_request, make_text

DEFAULT_CONTEXT_LEN = 2048


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--scenario", default="mixed", choices=[*SCENARIOS, "mixed"], include_in_web_ui=False,
                       help="which tagged task runs (same as --tags NAME); mixed runs all, weighted")
    parser.add_argument("--stream-fraction", type=float, default=1.0, help="share of requests sent with stream=true")
    parser.add_argument("--ignore-eos", action="store_true", default=False, help="send ignore_eos: every answer is max_tokens long")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="mean prompt length (0: the scenario's)")
    parser.add_argument("--output-tokens", type=int, default=0, help="mean max_tokens (0: the scenario's)")
    parser.add_argument("--range-ratio", type=float, default=-1.0, help="lengths uniform in mean*[1-r, 1+r] (-1: the scenario's)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds prompt/length draws (per user) and sampling")
    parser.add_argument("--model-name", default="", help="model field of requests (default: the first of /v1/models)")
    parser.add_argument("--context-len", type=int, default=0, help="context limit for long_prompt (default: /v1/models max_model_len, else 2048)")
    parser.add_argument("--max-requests", type=int, default=0, include_in_web_ui=False, help="stop the run after this many requests (0: no limit)")
    parser.add_argument("--think-time", type=float, default=0.0, help="seconds a user waits between requests")
    parser.add_argument("--samples-file", default="", include_in_web_ui=False, help="append one JSON line per request here")


@events.init.add_listener
def _on_init(environment: Environment, **_) -> None:
    options = environment.parsed_options
    if options and options.scenario != "mixed" and not options.tags:
        environment.tags = [options.scenario]     # read once, when the runner first starts


@events.quitting.add_listener
def _let_csv_catch_up(environment: Environment, **_) -> None:
    """Locust rewrites its --csv files once a second and not at exit; the requests that users
    finished during --stop-timeout would be missing. Yield for one more rewrite."""
    options = environment.parsed_options
    if options and getattr(options, "csv_prefix", None):
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


class ServerInfo:
    """Model name, context length and tokens per prompt word, asked of the server once per process."""

    _lock = threading.Lock()            # gevent-patched: a cooperative lock
    model: str = ""
    context_len: int = DEFAULT_CONTEXT_LEN
    tokens_per_word: float = 1.0
    _loaded = False

    @classmethod
    def load(cls, session: requests.Session, host: str, options) -> None:
        with cls._lock:
            if cls._loaded:
                return
            card = _first_model_card(session, host)
            cls.model = options.model_name or card.get("id", "")
            cls.context_len = options.context_len or card.get("max_model_len") or DEFAULT_CONTEXT_LEN
            cls.tokens_per_word = _tokens_per_word(session, host, cls.model)
            cls._loaded = True


def _first_model_card(session: requests.Session, host: str) -> dict:
    try:
        return session.get(host + "/v1/models", timeout=30).json()["data"][0]
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return {}


def _tokens_per_word(session: requests.Session, host: str, model: str) -> float:
    """Calibrate prompt lengths with the server's own tokenizer (1.0 if /tokenize is missing)."""
    sample = make_text(random.Random(0), 400)
    try:
        resp = session.post(host + "/tokenize", json={"model": model, "prompt": sample}, timeout=30)
        return max(0.5, resp.json()["count"] / 400)
    except (requests.RequestException, ValueError, KeyError):
        return 1.0


class RequestBudget:
    """The shared --max-requests count: claim() is False once it is spent; the last to finish quits."""

    def __init__(self) -> None:
        self.claimed = 0
        self.in_flight = 0

    def claim(self, limit: int) -> bool:
        if limit and self.claimed >= limit:
            return False
        self.claimed += 1
        self.in_flight += 1
        return True

    def release(self, limit: int, environment: Environment) -> None:
        self.in_flight -= 1
        if limit and self.claimed >= limit and self.in_flight == 0 and environment.runner:
            gevent.spawn(environment.runner.quit)


_budget = RequestBudget()
_user_ids = itertools.count()
_samples_lock = threading.Lock()


class NanoserveUser(User):
    """One simulated client: draws a request from the scenario, sends it, reports what it measured."""

    abstract = True
    api = "chat"
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.session = requests.Session()
        self.base_url = self.host.rstrip("/")
        ServerInfo.load(self.session, self.base_url, options)
        self.rng = random.Random(options.seed * 1_000_003 + next(_user_ids))
        if options.think_time:
            self.wait_time = between(0, 2 * options.think_time)

    def on_stop(self) -> None:
        self.session.close()

    @tag("short_chat")
    @task(SCENARIO_WEIGHTS["short_chat"])
    def short_chat(self) -> None:
        self.run_scenario("short_chat")

    @tag("long_prompt")
    @task(SCENARIO_WEIGHTS["long_prompt"])
    def long_prompt(self) -> None:
        self.run_scenario("long_prompt")

    @tag("long_generation")
    @task(SCENARIO_WEIGHTS["long_generation"])
    def long_generation(self) -> None:
        self.run_scenario("long_generation")

    @tag("shared_prefix")
    @task(SCENARIO_WEIGHTS["shared_prefix"])
    def shared_prefix(self) -> None:
        self.run_scenario("shared_prefix")

    @tag("rewrite")
    @task(SCENARIO_WEIGHTS["rewrite"])
    def rewrite(self) -> None:
        self.run_scenario("rewrite")

    def run_scenario(self, name: str) -> None:
        o = self.options
        if not _budget.claim(o.max_requests):
            raise StopUser()
        try:
            record = self.send_one(name)
        finally:
            _budget.release(o.max_requests, self.environment)
        self.report(record)

    def send_one(self, name: str) -> RequestRecord:
        o = self.options
        scenario = build_scenario(name, ServerInfo.context_len, o.prompt_tokens or None,
                                  o.output_tokens or None, None if o.range_ratio < 0 else o.range_ratio)
        spec = draw_request(scenario, self.rng, o.seed, ServerInfo.tokens_per_word)
        stream = self.rng.random() < o.stream_fraction
        seed = self.rng.randrange(2**31) if o.temperature > 0 else None
        body = build_body(spec, self.api, ServerInfo.model, stream, o.ignore_eos, o.temperature, seed)
        return send(self.session, self.base_url, spec, self.api, body)

    def report(self, record: RequestRecord) -> None:
        """Fire the POST / TTFT / ITL entries and append the sample line."""
        name = f"{endpoint_for(self.api)} [{record.scenario}]"
        fire = self.environment.events.request.fire
        error = Exception(record.error) if record.error else None
        fire(request_type="POST", name=name, response_time=record.e2e * 1000, response_length=record.output_tokens,
             exception=error, context={})
        if record.error is None and record.ttft is not None:
            fire(request_type="TTFT", name=name, response_time=record.ttft * 1000, response_length=0, exception=None, context={})
            for gap in record.itl:
                fire(request_type="ITL", name=name, response_time=gap * 1000, response_length=0, exception=None, context={})
        if self.options.samples_file:
            with _samples_lock, open(self.options.samples_file, "a") as f:
                f.write(record.to_json() + "\n")


class ChatUser(NanoserveUser):
    api = "chat"


class CompletionUser(NanoserveUser):
    api = "completions"
