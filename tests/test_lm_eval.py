"""EleutherAI's lm-evaluation-harness against nanoserve: its `local-completions` model, pointed at a
served tiny Llama, scores the shipped task (evals/lm_eval_tasks) as its `hf` model does on the
same checkpoint, whichever way it tokenizes: remotely through /tokenizer_info + /tokenize (its
default when the server has them), with the checkpoint's Hugging Face tokenizer, or as text."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import ROOT, run_server  # noqa: E402

TASK = "nanoserve_tiny"
TASKS_DIR = ROOT / "evals" / "lm_eval_tasks"
NUM_DOCS = 16


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoints, tmp_path_factory) -> Path:
    """The tiny Llama plus a tokenizer_config.json naming its BOS/EOS, which lm-eval's
    Hugging Face tokenizer needs and nanoserve reads too."""
    path = tmp_path_factory.mktemp("lm_eval") / "llama"
    shutil.copytree(hf_checkpoints["llama"][0], path)
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def llama_server(checkpoint):
    with run_server("--dtype", "float32", model=str(checkpoint)) as server:
        yield server


@pytest.fixture(scope="module")
def task_manager():
    """Indexes lm-eval's own tasks plus ours: seconds, so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


@pytest.fixture(scope="module")
def hf_run(checkpoint, task_manager) -> tuple[list[list[float]], dict]:
    return evaluate(task_manager, "hf", f"pretrained={checkpoint},dtype=float32")


@contextmanager
def in_repo_root() -> Iterator[None]:
    """The task's data_files path is relative to the repository root, as `datasets` resolves it."""
    previous = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(previous)


def evaluate(task_manager, model: str, model_args: str) -> tuple[list[list[float]], dict]:
    """(per document, the loglikelihood of each choice), and the task's metrics."""
    import lm_eval

    with in_repo_root():
        results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], device="cpu",
                                          task_manager=task_manager, log_samples=True)
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    return [[loglikelihood for loglikelihood, _ in s["filtered_resps"]] for s in samples], results["results"][TASK]


def test_tokenizer_info_names_special_tokens_that_tokenize_to_one_id(llama_server):
    with llama_server.client() as client:
        info = client.get("/tokenizer_info").json()
        assert (info["bos_token"], info["eos_token"], info["add_bos_token"]) == ("<s>", "</s>", False)
        assert info["vocab_size"] == 300 and info["model_max_length"] == 256
        for token, token_id in (("<s>", 0), ("</s>", 1)):
            body = {"prompt": token, "add_special_tokens": False}
            assert client.post("/tokenize", json=body).json()["tokens"] == [token_id]


@pytest.mark.parametrize("extra_args", [
    "",                                                     # the README's: auto -> remote tokenizer
    ",tokenizer_backend=huggingface,batch_size=8",          # local tokenizer, 8 prompts a request
    ",tokenizer_backend=remote,tokenized_requests=False",   # prompts sent as text
], ids=["default", "huggingface-batched", "text-prompts"])
def test_local_completions_scores_like_hf(llama_server, checkpoint, task_manager, hf_run, extra_args):
    base_url = f"{llama_server.url}/v1/completions"
    served, served_metrics = evaluate(task_manager, "local-completions", f"model={checkpoint},base_url={base_url}{extra_args}")
    reference, reference_metrics = hf_run
    assert len(served) == len(reference) == NUM_DOCS
    for served_doc, reference_doc in zip(served, reference):
        assert served_doc == pytest.approx(reference_doc, abs=1e-3)
    for metric in ("acc,none", "acc_norm,none"):
        assert served_metrics[metric] == reference_metrics[metric]


def test_tokenizer_info_is_503_while_loading():
    """Like every model route, an OpenAI-shaped 503 until the model is loaded."""
    from fastapi.testclient import TestClient

    from server.api.app import build_app
    from server.api.server_config import ServerConfig

    app = build_app(ServerConfig(model="random:tiny-qwen2"))  # no lifespan runs: nothing loads
    response = TestClient(app).get("/tokenizer_info")
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
