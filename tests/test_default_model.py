"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF from PyPI) answers a real question."""
from __future__ import annotations

import pytest

from models.loader import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct", device="cpu")


def test_default_model_shapes(smollm2):
    c = smollm2.model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and not c.qkv_bias
    assert smollm2.max_model_len == 8192


def test_default_model_greedy_chat_names_paris(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    out = smollm2.model.generate(ids, 24, stop_token_ids=tuple(tok.stop_token_ids))
    answer = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer
