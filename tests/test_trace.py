"""`nanoserve trace`: shapes at known points of a real paged prefill and decode, computed from
the model's config (not pasted), and attention metadata that agrees with the block tables."""
from __future__ import annotations

import json
import math

import pytest

from models.loader import load_model
from server.cli import main

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello there"]


def _trace(capsys, model: str, *flags: str) -> dict:
    argv = ["trace", "--model", model, "--decode-steps", "2", "--block-size", "4", "--json", *flags]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _calls(step: dict, type_name: str) -> list[dict]:
    return [m for m in step["modules"] if m["type"] == type_name]


def _check_engine_bookkeeping(trace: dict, prompt_lens: list[int], block_size: int) -> None:
    """Prefill packs both prompts, each decode adds one token per sequence; every slot is where
    the sequence's block table says its position lives, and the step holds exactly the blocks
    its contexts need."""
    prefill, *decodes = trace["steps"]
    assert prefill["kind"] == "prefill" and prefill["num_tokens"] == sum(prompt_lens)
    assert prefill["metadata"]["query_start_loc"] == [0, prompt_lens[0], sum(prompt_lens)]
    assert [d["kind"] for d in decodes] == ["decode", "decode"]
    for i, step in enumerate(decodes, start=1):
        assert step["num_tokens"] == 2 and step["positions"] == [n + i - 1 for n in prompt_lens]
        assert step["metadata"]["seq_lens"] == [n + i for n in prompt_lens]
    for step in trace["steps"]:
        meta = step["metadata"]
        seqs = [s for s in range(2) for _ in range(meta["query_start_loc"][s + 1] - meta["query_start_loc"][s])]
        expected = [meta["block_tables"][s][p // block_size] * block_size + p % block_size
                    for s, p in zip(seqs, step["positions"])]
        assert meta["slot_mapping"] == expected
        assert step["blocks_used"] == sum(math.ceil(n / block_size) for n in meta["seq_lens"])


def _shape(info: dict) -> tuple[list[int], list[str]]:
    return info["shape"], info["dims"]


def test_gpt2_trace_shapes_follow_the_config(capsys):
    loaded = load_model("random:tiny-gpt2")
    c = loaded.model.config
    C, H, D, V = c.n_embd, c.n_head, c.n_embd // c.n_head, c.vocab_size
    lens = [len(loaded.tokenizer.encode(p)) for p in PROMPTS]
    trace = _trace(capsys, "random:tiny-gpt2")
    assert trace["dims"]["C"] == C and trace["dims"]["V"] == V
    assert trace["kv_cache"]["pool_shape"][1:] == [4, H, D]
    _check_engine_bookkeeping(trace, lens, 4)
    for step in trace["steps"]:
        N = step["num_tokens"]
        wte = next(m for m in step["modules"] if m["name"] == "transformer.wte")
        assert _shape(wte["outputs"][0]) == ([N, C], ["N", "C"])
        attention = _calls(step, "PagedAttention")
        assert len(attention) == c.n_layer
        q, k, v = attention[0]["inputs"][:3]
        for t in (q, k, v, attention[0]["outputs"][0]):  # q, k, v after the head split; attention output
            assert _shape(t) == ([N, H, D], ["N", "H", "D"])
        assert _shape(attention[0]["inputs"][3]) == (trace["kv_cache"]["pool_shape"], ["NB", "BS", "H", "D"])
        qkv = next(m for m in step["modules"] if m["name"] == "transformer.h.0.attn.c_attn")
        assert _shape(qkv["outputs"][0]) == ([N, 3 * C], ["N", "3C"])
        logits = next(m for m in step["modules"] if m["name"] == "lm_head")["outputs"][0]
        assert logits["shape"] == [2, V] and logits["dims"][1] == "V"  # one sampling row per sequence


def test_qwen_trace_shows_grouped_kv_heads(capsys):
    overrides = "heads=8,kv_heads=2,head_dim=16"
    loaded = load_model("random:tiny-qwen3", overrides={"heads": "8", "kv_heads": "2", "head_dim": "16"})
    c = loaded.model.config
    H, KVH, D, C = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    lens = [len(loaded.tokenizer.encode(p)) for p in PROMPTS]
    trace = _trace(capsys, "random:tiny-qwen3", "--override", overrides)
    _check_engine_bookkeeping(trace, lens, 4)
    for step in trace["steps"]:
        N = step["num_tokens"]
        embed = next(m for m in step["modules"] if m["name"] == "model.embed_tokens")
        assert _shape(embed["outputs"][0]) == ([N, C], ["N", "C"])
        qkv = next(m for m in step["modules"] if m["name"] == "model.layers.0.self_attn.qkv_proj")
        assert _shape(qkv["outputs"][0]) == ([N, (H + 2 * KVH) * D], ["N", "(H+2KVH)*D"])
        attention = _calls(step, "PagedAttention")
        assert len(attention) == c.num_hidden_layers
        q, k, v = attention[0]["inputs"][:3]
        assert _shape(q) == ([N, H, D], ["N", "H", "D"])
        assert _shape(k) == _shape(v) == ([N, KVH, D], ["N", "KVH", "D"])
        assert _shape(attention[0]["outputs"][0]) == ([N, H, D], ["N", "H", "D"])
        block_inputs = next(m for m in step["modules"] if m["name"] == "model.layers.0")["inputs"]
        assert [b["shape"] for b in block_inputs] == [[N, C], [N, 1, D], [N, 1, D]]  # x, then the RoPE cos and sin
        o_proj = next(m for m in step["modules"] if m["name"] == "model.layers.0.self_attn.o_proj")
        assert _shape(o_proj["inputs"][0]) == ([N, H * D], ["N", "H*D"])
        logits = next(m for m in step["modules"] if m["name"] == "lm_head")["outputs"][0]
        assert logits["shape"] == [2, c.vocab_size]


@pytest.mark.parametrize("model", ["random:tiny-deepseek-v3", "random:tiny-qwen3-moe"])
def test_trace_covers_latent_attention_and_experts(capsys, model):
    trace = _trace(capsys, model)
    step = trace["steps"][-1]
    assert step["kind"] == "decode" and _calls(step, "TopKRouter")
    router = _calls(step, "TopKRouter")[0]
    assert [t["dims"] for t in router["outputs"]] == [["N", "K"], ["N", "K"]]  # weights and expert ids
    if "deepseek" in model:
        d = trace["dims"]
        assert trace["kv_cache"]["pool_shape"][2:] == [1, d["L+R"]]  # one latent + RoPE key per token
        assert _calls(step, "MLAttention")


def test_text_tree_folds_identical_layers(capsys):
    assert main(["trace", "--model", "random:tiny-gpt2", "--override", "layers=4", "--decode-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "paged_attn (PagedAttention)" in out and "(N=" in out
    assert "layers 1-3: same shapes as layer 0" in out
    assert main(["trace", "--model", "random:tiny-gpt2", "--decode-steps", "0", "--all-layers"]) == 0
    out = capsys.readouterr().out
    assert "same shapes" not in out and out.count("(Block)") == 2


def test_trace_refuses_bad_flags(capsys):
    assert main(["trace", "--model", "random:tiny-gpt2", "--decode-steps", "-1"]) == 2
    assert "--decode-steps must be >= 0" in capsys.readouterr().err
