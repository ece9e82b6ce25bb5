"""Every PromQL expression of the Grafana dashboard, evaluated by a real Prometheus that scrapes a real
server: each must parse and return a finite value after some traffic.

Prometheus is the Debian package (`make prometheus` installs it); it runs on a free loopback port
with docker/prometheus.yml, its target rewritten to the test server and its interval shortened.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from loadtest.launcher import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "nanoserve.json"
RATE_INTERVAL = "1m"          # what Grafana's $__rate_interval stands for here

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus binary not found (`make prometheus` installs the Debian package)")


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def to_promql(expr: str) -> str:
    """Replace Grafana's variables with what they stand for on a dashboard showing every model."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model_name", ".*")


def _prometheus_config(server_port: int, path: Path) -> None:
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        job["scrape_interval"] = "1s"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{server_port}"]}]
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess("random:tiny-qwen2", "--num-kv-blocks 48 --max-num-seqs 8", log_path=log,
                       startup_timeout_s=120) as s:
        yield s


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    _prometheus_config(server.port, workdir / "prometheus.yml")
    port = free_port()
    proc = subprocess.Popen(["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, 30, "Prometheus ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def _traffic(url: str, model: str) -> None:
    """Streamed and plain requests, both finish reasons, a shared prefix, and KV pressure."""
    system = "You are a careful assistant. " + "the river city music " * 40
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(3):
            client.post("/v1/chat/completions", json={
                "model": model, "stream": True, "max_tokens": 12, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]}).read()
        client.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 8, "stop": [" "],
                                             "temperature": 1.0, "seed": 1})
        client.post("/v1/completions", json={"model": model, "prompt": "a b c " * 60, "max_tokens": 150,
                                             "ignore_eos": True, "n": 4})


def _query(prometheus: str, expr: str) -> dict:
    return httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()


def _finite_values(result: dict) -> list[float]:
    return [float(v[1]) for series in result["data"]["result"] for v in [series["value"]] if math.isfinite(float(v[1]))]


def test_every_dashboard_expression_returns_data(server, prometheus):
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    # one scrape before the traffic, so that rate() sees the counters move
    _wait_for(lambda: _finite_values(_query(prometheus, "nanoserve_generation_tokens_total")), 20, "a first scrape")
    _traffic(server.url, model)
    total = sum(_finite_values(_query(prometheus, "nanoserve_generation_tokens_total")))
    _wait_for(lambda: sum(_finite_values(_query(prometheus, "nanoserve_generation_tokens_total"))) > total, 20,
              "a scrape after the traffic")

    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    problems = []
    for title, expr in exprs:
        result = _query(prometheus, to_promql(expr))
        if result.get("status") != "success":
            problems.append(f"{title}: {expr}: {result.get('error')}")
        elif not _finite_values(result):
            problems.append(f"{title}: {expr}: no finite value ({result['data']['result']})")
    assert not problems, "\n".join(problems)


def test_model_variable_query_finds_the_model(server, prometheus):
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]
    metric, label = variable["definition"].removeprefix("label_values(").removesuffix(")").split(", ")
    result = _query(prometheus, metric)
    assert {s["metric"][label] for s in result["data"]["result"]} == {"random:tiny-qwen2"}
