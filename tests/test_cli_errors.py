"""Every `nanoserve` command given a model it cannot load prints one sentence and exits 1:
no Python traceback for a user's mistake (here: a config.json of an unsupported model_type)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.api_fixtures import ROOT, free_port


@pytest.fixture(scope="module")
def unsupported_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mamba")
    (path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    return path


@pytest.mark.parametrize("command", [["generate", "hello"], ["bench", "--num-prompts", "1"],
                                     ["serve", "--port", str(free_port())]])
def test_unloadable_model_is_one_sentence_and_exit_1(unsupported_checkpoint, command):
    argv = [sys.executable, "-m", "server.cli", command[0], "--model", str(unsupported_checkpoint), *command[1:]]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model_type 'mamba'" in done.stderr and "not supported" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--speculative", "medusa"], "unknown speculative method 'medusa'"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "at least 1"),
    (["--quantization", "int3"], "'int3' is not one of none, int8, int4, int4-g64, int4-g128, gguf"),
    (["--kv-cache-dtype", "fp4"], "'fp4' is not one of auto, int8"),
])
def test_bad_engine_flags_are_one_sentence_and_exit_2(flags, message):
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", "random:tiny-gpt2", "--port", str(free_port()), *flags]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_draft_with_another_tokenizer_is_one_sentence():
    argv = [sys.executable, "-m", "server.cli", "serve", "--model", "random:tiny-gpt2", "--port", str(free_port()),
            "--speculative", "draft:random:tiny-qwen2"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "does not share the tokenizer" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("flags, message, code", [
    (["serve", "--model", "random:tiny-deepseek-v3", "--port", str(free_port()), "--mla-mode", "fast"], "invalid choice", 2),
    (["bench", "--model", "random:tiny-qwen3-moe", "--num-prompts", "1", "--baseline", "hf"], "--baseline naive for MoE", 2),
])
def test_bad_mla_and_moe_flags_are_one_sentence(flags, message, code):
    done = subprocess.run([sys.executable, "-m", "server.cli", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == code and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
