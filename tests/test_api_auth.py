"""--api-key (here from NANOSERVE_API_KEY) protects /v1/*; /health and /metrics stay open."""
from __future__ import annotations

import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import TINY_MODEL, run_server  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server():
    with run_server(env={"NANOSERVE_API_KEY": KEY}) as server:
        yield server


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_v1_routes_need_the_key(keyed_server, headers):
    with keyed_server.client(headers=headers) as client:
        for response in (client.get("/v1/models"),
                         client.post("/v1/completions", json={"prompt": "hi"}),
                         client.post("/v1/chat/completions", content=b"{not json")):
            assert response.status_code == 401
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"


def test_health_and_metrics_stay_open(keyed_server):
    with keyed_server.client() as client:
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_right_key_works_with_openai_client(keyed_server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        keyed_server.openai(api_key="wrong").models.list()
    client = keyed_server.openai(api_key=KEY)
    assert [m.id for m in client.models.list().data] == [TINY_MODEL]
    out = client.completions.create(model=TINY_MODEL, prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens <= 2
