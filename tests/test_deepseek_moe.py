"""DeepSeek-V2/V3 (MLA + MoE) and Qwen3-MoE against transformers, and the parts on their own.

Routers get large random weights (and V3 a random selection bias) so that routing really
depends on the token; transformers' own init would route almost uniformly.
"""
from __future__ import annotations

import pytest
import torch

from models.base import KVCacheSpec
from models.deepseek import DeepseekConfig, DeepseekModel
from models.loader import load_model
from models.moe import Experts, MoEConfig, TopKRouter, grouped_mm_reference
from server.config import EngineConfig
from tests.conftest import tiny_llama_tokenizer_json
from tests.test_model_parity import assert_parity, hf_logits, prompt_ids

VOCAB = 300
MLA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=24,
           n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}


def hf_moe_models():
    import transformers

    return {
        "deepseek_v2": transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
            **MLA, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy", n_group=4,
            topk_group=2, routed_scaling_factor=1.5)),
        "deepseek_v3": transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            **MLA, q_lora_rank=48, n_shared_experts=1, n_group=2, topk_group=1, rope_parameters=YARN)),
        "qwen3_moe": transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=256)),
    }


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    """family -> (HF directory, HF model), routers randomized so that routing matters."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, model in hf_moe_models().items():
        with torch.no_grad():
            for key, param in model.named_parameters():
                if key.endswith("mlp.gate.weight"):
                    param.normal_(0, 1.0)
                elif key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    param.normal_(0, 0.1)
            for key, buffer in model.named_buffers():
                if key.endswith("e_score_correction_bias"):
                    buffer.uniform_(-0.3, 0.3)
        model.eval().save_pretrained(root / name)
        tiny_llama_tokenizer_json(root / name)
        out[name] = (root / name, model)
    return out


@pytest.mark.parametrize("family,mode", [("deepseek_v2", "absorbed"), ("deepseek_v2", "naive"),
                                         ("deepseek_v3", "absorbed"), ("deepseek_v3", "naive"),
                                         ("qwen3_moe", None)])
def test_hf_parity(moe_checkpoints, family, mode):
    """Full forward, paged incremental (chunked prefill, then one token at a time), 20 greedy tokens."""
    path, hf_model = moe_checkpoints[family]
    loaded = load_model(str(path), dtype="float32", device="cpu")
    if mode:
        loaded.model.set_mla_mode(mode)
    assert_parity(loaded.model, hf_model, VOCAB)


def test_rope_deinterleave_is_load_bearing(moe_checkpoints, monkeypatch):
    from models import hf_checkpoint

    path, hf_model = moe_checkpoints["deepseek_v3"]
    monkeypatch.setattr(hf_checkpoint, "deinterleave_rope_rows", lambda tensors, config: tensors)
    loaded = load_model(str(path), dtype="float32", device="cpu")
    ids = prompt_ids(VOCAB)
    assert not torch.allclose(loaded.model.full_logits(ids), hf_logits(hf_model, ids), atol=1e-3)


def test_group_limited_routing_picks_only_from_the_best_groups():
    torch.manual_seed(0)
    config = MoEConfig(num_experts=16, top_k=4, intermediate_size=8, scoring="sigmoid", num_groups=4,
                       topk_groups=2, group_score="top2_sum", correction_bias=True)
    router = TopKRouter(32, config)
    torch.nn.init.normal_(router.weight, 0, 1.0)
    router.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(50, 32)
    weights, ids = router(x)
    choice = torch.sigmoid(x @ router.weight.T) + router.e_score_correction_bias  # (N, E)
    group_scores = choice.view(50, 4, 4).topk(2, dim=-1).values.sum(-1)  # (N, G)
    best = group_scores.topk(2, dim=-1).indices  # (N, 2)
    assert all(set((ids[n] // 4).tolist()) <= set(best[n].tolist()) for n in range(50))
    plain = torch.sigmoid(x @ router.weight.T).gather(1, ids)  # weights ignore the bias
    torch.testing.assert_close(weights, plain / plain.sum(-1, keepdim=True))


def test_expert_dispatch_equals_a_per_token_loop():
    torch.manual_seed(0)
    config = MoEConfig(num_experts=6, top_k=2, intermediate_size=16)
    experts = Experts(24, config)
    torch.nn.init.normal_(experts.gate_up_proj, 0, 0.2)
    torch.nn.init.normal_(experts.down_proj, 0, 0.2)
    x, ids = torch.randn(9, 24), torch.randint(0, 6, (9, 2))
    weights = torch.rand(9, 2)
    out, counts = experts(x, weights, ids)
    expected = torch.zeros_like(x)
    for n in range(9):
        for k in range(2):
            gate, up = (experts.gate_up_proj[ids[n, k]] @ x[n]).chunk(2)
            expected[n] += weights[n, k] * (experts.down_proj[ids[n, k]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=6).tolist()
    xs, w = torch.randn(7, 24), torch.randn(6, 16, 24)
    counts = torch.tensor([2, 0, 3, 0, 0, 2])
    torch.testing.assert_close(grouped_mm_reference(xs, w, counts),
                               torch.cat([xs[:2] @ w[0].T, xs[2:5] @ w[2].T, xs[5:] @ w[5].T]))


def test_mla_pool_stores_only_latents_and_holds_more_tokens():
    """bytes/token = layers x (kv_lora_rank + rope dim) x dtype size, and the same memory budget
    buys as many more tokens as that is smaller than per-head K/V."""
    config = DeepseekConfig(**MLA, q_lora_rank=None, n_shared_experts=1)
    with torch.device("meta"):
        model = DeepseekModel(config)
    spec = model.kv_cache_spec
    assert spec.bytes_per_block(1, torch.bfloat16) == 3 * (32 + 16) * 2
    mha = KVCacheSpec(3, 4, 16 + 16)  # per-head K and V of the same heads (Dn + R wide), 3 layers
    engine_config = EngineConfig(kv_cache_memory=2**26, block_size=16, max_num_seqs=10**6)
    mla_blocks = engine_config.resolve_num_blocks(spec, torch.bfloat16, 10**9)
    mha_blocks = engine_config.resolve_num_blocks(mha, torch.bfloat16, 10**9)
    assert mla_blocks == 2**26 // (16 * 3 * 48 * 2)
    assert mla_blocks / mha_blocks == pytest.approx(mha.bytes_per_block(1, torch.bfloat16) / (3 * 48 * 2), rel=1e-3)
    pools = spec.allocate(2, 16, torch.float32)
    assert len(pools) == 3 and all(len(p) == 1 and p[0].shape == (2, 16, 1, 48) for p in pools)


@pytest.mark.parametrize("family,split_kv_b", [("deepseek_v2", True), ("deepseek_v3", True), ("deepseek_v3", False)])
def test_gguf_deepseek2_parity(moe_checkpoints, tmp_path, family, split_kv_b):
    """A `deepseek2` GGUF written as llama.cpp's converter does (kv_b split into attn_k_b/attn_v_b,
    or whole as in older files; experts stacked) loads and equals transformers."""
    from models.builtin import builtin_model_path
    from tests.gguf_writer import write_deepseek2_gguf

    _, hf_model = moe_checkpoints[family]
    path = tmp_path / f"{family}.gguf"
    write_deepseek2_gguf(path, hf_model, str(builtin_model_path("smollm2-135m-instruct")), split_kv_b=split_kv_b)
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert_parity(loaded.model, hf_model, VOCAB)


def test_multi_token_prediction_layers_are_skipped(moe_checkpoints, tmp_path):
    """V3 checkpoints carry an MTP layer after the last one (`model.layers.<L>.*`); it is not part
    of the forward and must not stop the load."""
    import shutil

    from safetensors.torch import save_file

    path, hf_model = moe_checkpoints["deepseek_v3"]
    copy = tmp_path / "with_mtp"
    shutil.copytree(path, copy)
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(64, 128),
               "model.layers.3.self_attn.kv_b_proj.weight": torch.zeros(160, 32)}, copy / "model-mtp.safetensors")
    loaded = load_model(str(copy), dtype="float32", device="cpu")
    ids = prompt_ids(VOCAB)
    torch.testing.assert_close(loaded.model.full_logits(ids), hf_logits(hf_model, ids), atol=2e-4, rtol=1e-4)
