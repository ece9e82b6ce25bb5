"""Write a GGUF file from a tiny HF Llama/Qwen model the way llama.cpp's converter does.

Tensors are renamed to GGUF names, Llama q/k rows are permuted for interleaved RoPE, and the
tokenizer fields are copied from the default model's GGUF (SmolLM2's byte-level BPE).
`write_gpt2_gguf` writes a nanoserve GPT-2 with GPT-2's own vocabulary.
"""
from __future__ import annotations

import gguf
import numpy as np

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def permute_for_interleaved_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permutation of q/k rows (rotate-half -> interleaved)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def write_gguf(path, hf_model, arch: str, tokenizer_source: str, quantize_ffn: bool = False,
               types: dict[str, gguf.GGMLQuantizationType] | None = None) -> None:
    """quantize_ffn: MLP tensors as Q8_0; types: tensor type by a substring of the HF name."""
    cfg = hf_model.config
    types = dict(types or {})
    if quantize_ffn:
        types[".mlp."] = gguf.GGMLQuantizationType.Q8_0
    source = gguf.GGUFReader(tokenizer_source)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    for key in TOKENIZER_KEYS:
        field = source.fields[key]
        values = field.contents()
        if key == "tokenizer.ggml.tokens":
            writer.add_token_list(values)
        elif key == "tokenizer.ggml.merges":
            writer.add_token_merges(values)
        else:
            writer.add_token_types(values)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(source.fields["tokenizer.chat_template"].contents())
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = permute_for_interleaved_rope(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = permute_for_interleaved_rope(data, cfg.num_key_value_heads)
        kind = next((t for part, t in types.items() if part in name), None)
        if kind is not None:
            q = gguf.quants.quantize(data, kind)
            writer.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


DEEPSEEK2_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
    "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}


def write_deepseek2_gguf(path, hf_model, tokenizer_source: str, split_kv_b: bool = True) -> None:
    """A DeepSeek-V2/V3 HF model as llama.cpp's converter writes it: MLA as MQA over the latent
    (key_length = L + R), kv_b split into attn_k_b (H, L, Dn) and attn_v_b (H, Dv, L) (or kept
    whole as in older files), experts stacked, RoPE rows left interleaved."""
    cfg = hf_model.config
    source = gguf.GGUFReader(tokenizer_source)
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.n_group:
        writer.add_expert_group_count(cfg.n_group)
        writer.add_expert_group_used_count(cfg.topk_group)
    v3 = cfg.model_type == "deepseek_v3"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_leading_dense_block_count(cfg.first_k_dense_replace)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    if getattr(cfg, "norm_topk_prob", False) and v3:
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_merges(source.fields["tokenizer.ggml.merges"].contents())
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    experts: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in {**hf_model.state_dict(), **dict(hf_model.named_buffers())}.items():
        data = tensor.detach().float().numpy()
        if name in TOP_NAMES:
            writer.add_tensor(TOP_NAMES[name], np.ascontiguousarray(data))
            continue
        if "rotary_emb" in name:
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if module == "mlp.experts":  # transformers keeps experts stacked: gate_up (E, 2I, C), down (E, C, I)
            if kind == "gate_up_proj":
                gate, up = np.split(data, 2, axis=1)
                experts.setdefault(layer, {}).update(ffn_gate_exps=gate, ffn_up_exps=up)
            else:
                experts.setdefault(layer, {})["ffn_down_exps"] = data
        elif module == "mlp.gate" and kind == "e_score_correction_bias":
            writer.add_tensor(f"blk.{layer}.exp_probs_b.bias", data)
        elif module == "self_attn.kv_b_proj" and split_kv_b:
            kv_b = data.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)  # (H, Dn + Dv, L)
            writer.add_tensor(f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :cfg.qk_nope_head_dim].swapaxes(1, 2)))
            writer.add_tensor(f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, cfg.qk_nope_head_dim:]))
        elif module == "self_attn.kv_b_proj":
            writer.add_tensor(f"blk.{layer}.attn_kv_b.weight", data)
        else:
            writer.add_tensor(f"blk.{layer}.{DEEPSEEK2_LAYER_NAMES[module]}.{kind}", np.ascontiguousarray(data))
    for layer, parts in experts.items():
        for part, data in parts.items():
            writer.add_tensor(f"blk.{layer}.{part}.weight", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gpt2_gguf(path, model, vocab: dict, types: dict[str, gguf.GGMLQuantizationType],
                    output: gguf.GGMLQuantizationType | None = None) -> None:
    """A nanoserve GPT-2 as llama.cpp's converter lays one out: fused attn_qkv, weights (out, in)
    (the converter transposes HF's Conv1D), biases, position_embd, the LM head tied to
    token_embd. vocab: tokenizer.ggml.* fields; types: tensor type by a substring of our name;
    output: also write the head as `output.weight` of this type (the converter's duplicate)."""
    from models.gguf_checkpoint import GPT2_LAYER_NAMES, GPT2_NAMES

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # as llama.cpp's convert_hf_to_gguf.py names GPT-2's
    writer.add_token_list(vocab["tokenizer.ggml.tokens"])
    writer.add_token_merges(vocab["tokenizer.ggml.merges"])
    writer.add_token_types(vocab["tokenizer.ggml.token_type"])
    writer.add_eos_token_id(vocab["tokenizer.ggml.eos_token_id"])
    top = {ours: theirs for theirs, ours in GPT2_NAMES.items()}
    per_layer = {ours: theirs for theirs, ours in GPT2_LAYER_NAMES.items()}
    for name, tensor in model.state_dict().items():
        stem, kind = name.rsplit(".", 1)
        if stem == "lm_head":
            if output is not None:
                q = gguf.quants.quantize(tensor.detach().float().numpy(), output)
                writer.add_tensor("output.weight", q, raw_shape=q.shape, raw_dtype=output)
            continue  # tied
        if stem in top:
            gguf_name = f"{top[stem]}.{kind}"
        else:
            _, _, layer, module = stem.split(".", 3)  # transformer.h.<i>.<module>
            gguf_name = f"blk.{layer}.{per_layer[module]}.{kind}"
        data = tensor.detach().float().numpy()
        quant = next((t for part, t in types.items() if part in name), None) if kind == "weight" else None
        if quant is not None:
            q = gguf.quants.quantize(data, quant)
            writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
