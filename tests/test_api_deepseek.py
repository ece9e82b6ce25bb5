"""DeepSeek (MLA + MoE) served over HTTP like any model: a random preset and an HF directory,
the expert-load histogram in /metrics, the KV bytes per token in the log."""
from __future__ import annotations

import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_idle, run_server  # noqa: E402
from tests.conftest import tiny_llama_tokenizer_json  # noqa: E402
from tests.test_deepseek_moe import MLA  # noqa: E402


def test_random_preset_serves_completions_chat_and_expert_metrics():
    with run_server("--dtype", "float32", "--mla-mode", "naive", model="random:tiny-deepseek-v3") as server:
        client = server.openai()
        done = client.completions.create(model="random:tiny-deepseek-v3", prompt="Hello there", max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
        chat = client.chat.completions.create(model="random:tiny-deepseek-v3", max_tokens=5, temperature=0,
                                              messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.role == "assistant"
        metrics = server.metrics()
        assert metrics[("nanoserve_moe_expert_tokens_count", ())] > 0
        assert metrics[("nanoserve_moe_expert_tokens_count", ())] % 8 == 0, "one sample per expert per step"
        log = server.log_tail(200_000)
        assert "decode attention: MLA naive" in log
        assert "384 bytes/token = 1 (latent) x 2 layers x 1 heads x 48 x 4 B" in log  # fp32: 2 x 48 x 4
        assert_idle(server)


def test_hf_directory_serves(tmp_path):
    import transformers

    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**MLA, q_lora_rank=None, n_shared_experts=1))
    model.eval().save_pretrained(tmp_path)
    tiny_llama_tokenizer_json(tmp_path)
    with run_server("--dtype", "float32", model=str(tmp_path)) as server:
        done = server.openai().completions.create(model=str(tmp_path), prompt="the quick brown fox", max_tokens=6,
                                                  temperature=0, extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 6
        assert "decode attention: MLA absorbed" in server.log_tail(200_000)
        assert_idle(server)
