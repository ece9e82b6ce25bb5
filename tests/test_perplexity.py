"""`nanoserve eval perplexity`: the engine's strided-window perplexity equals a direct
computation with the reference forward, every token is scored once, and bad input is refused."""
from __future__ import annotations

import json
import math

import pytest
import torch

from models.loader import load_model
from server.cli import main
from server.lab.perplexity import default_corpus, perplexity, strided_windows

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families, that he is considered the rightful property of some one or other of "
        "their daughters.")


@pytest.mark.parametrize("num_tokens, window, stride", [(10, 4, 2), (10, 4, 4), (9, 10, 5), (7, 3, 1), (2, 2, 1)])
def test_windows_score_every_token_but_the_first_once(num_tokens, window, stride):
    scored = [p for begin, end, first in strided_windows(num_tokens, window, stride) for p in range(first, end)]
    assert scored == list(range(1, num_tokens))
    for begin, end, first in strided_windows(num_tokens, window, stride):
        assert end - begin <= window and begin < first


def _reference_nll(model, tokens: list[int], window: int, stride: int) -> float:
    """The same windows through the cache-free reference forward, log-softmax by hand."""
    nll = 0.0
    for begin, end, first in strided_windows(len(tokens), window, stride):
        logprobs = torch.log_softmax(model.full_logits(tokens[begin:end]).double(), dim=-1)  # (T, V)
        for p in range(first, end):
            nll -= float(logprobs[p - begin - 1, tokens[p]])
    return nll


@pytest.mark.parametrize("model", ["random:tiny-qwen2", "random:tiny-gpt2"])
def test_engine_perplexity_matches_the_reference_forward(model):
    reference = load_model(model, dtype="float32", device="cpu")
    tokens = reference.tokenizer.encode(TEXT)
    expected = _reference_nll(reference.model, tokens, window=24, stride=10)
    served = load_model(model, dtype="float32", device="cpu")  # the engine packs this copy's weights
    result = perplexity(served, model, TEXT, "inline", window=24, stride=10)
    assert result.num_scored_tokens == len(tokens) - 1
    assert result.nll_nats == pytest.approx(expected, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(expected / (len(tokens) - 1)), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / len(TEXT.encode()), rel=0.05)


def test_cli_defaults_to_hamlet_and_writes_json(tmp_path, capsys):
    assert default_corpus().read_text().startswith("HAMLET, PRINCE OF DENMARK")
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", "random:tiny-gpt2", "--max-tokens", "200", "--window", "64",
                 "--json", str(out)]) == 0
    line = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["corpus"] == "hamlet_gut.txt" and data["num_scored_tokens"] == 199 and data["stride"] == 32
    assert f"perplexity {data['perplexity']:.3f}" in line


def test_cli_refuses_bad_input(tmp_path, capsys):
    assert main(["eval", "perplexity", "--model", "random:tiny-gpt2", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read the text" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("a")
    assert main(["eval", "perplexity", "--model", "random:tiny-gpt2", "--text", str(tmp_path / "short.txt")]) == 2
    assert "at least 2 tokens" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--model", "random:tiny-gpt2", "--window", "8", "--stride", "9"]) == 2
    assert "the stride between 1 and the window (8), not 9" in capsys.readouterr().err
