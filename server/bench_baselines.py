"""Baselines for `nanoserve bench`, run on the same prompts and weights:

  naive  the model's reference decoder, one request at a time, full forward per token, no cache
  hf     Hugging Face `generate` with static batches (best of several batch sizes), the same
         weights copied into the matching transformers model
"""
from __future__ import annotations

import time

import torch

from models.gpt2 import GPT2
from models.qwen import QwenModel
from models.loader import LoadedModel
from server.bench_results import BenchResult

HF_BATCH_SIZES = (8, 16, 32, 64)


def run_naive(loaded: LoadedModel, prompts: list[list[int]], output_len: int, max_prompts: int = 2) -> BenchResult:
    """Sequential naive decoding on the first `max_prompts` prompts (it is slow); tokens/s is per
    request anyway, so a subset measures the same rate."""
    subset = prompts[:max_prompts]
    start = time.perf_counter()
    for prompt in subset:
        loaded.model.generate(prompt, output_len)
    elapsed = time.perf_counter() - start
    num_out, num_in = len(subset) * output_len, sum(len(p) for p in subset)
    return BenchResult(f"naive ({len(subset)} prompts)", len(subset), len(subset[0]), output_len, elapsed,
                       len(subset) / elapsed, num_out / elapsed, (num_in + num_out) / elapsed)


def run_hf_generate(loaded: LoadedModel, hf_model: torch.nn.Module, prompts: list[list[int]],
                    output_len: int) -> BenchResult:
    """HF generate in static batches; reports the best batch size's throughput."""
    best, per_size = None, {}
    for batch_size in [b for b in HF_BATCH_SIZES if b <= len(prompts)] or [len(prompts)]:
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[i:i + batch_size], device=loaded.device)  # (B, T), equal lengths
            with torch.inference_mode():
                hf_model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=output_len,
                                  min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
        per_size[batch_size] = round(len(prompts) * output_len / elapsed, 1)
        if best is None or elapsed < best[1]:
            best = (batch_size, elapsed)
    batch_size, elapsed = best
    num_out, num_in = len(prompts) * output_len, sum(len(p) for p in prompts)
    return BenchResult(f"hf generate (batch {batch_size})", len(prompts), len(prompts[0]), output_len, elapsed,
                       len(prompts) / elapsed, num_out / elapsed, (num_in + num_out) / elapsed,
                       {"output_tok_s_by_batch_size": per_size})


def to_transformers(loaded: LoadedModel) -> torch.nn.Module:
    """The same weights in the matching transformers model (GPT2LMHeadModel / Qwen2 / Qwen3 / Llama)."""
    import transformers

    model = loaded.model
    if not (isinstance(model, GPT2) or isinstance(model, QwenModel) and not model.config.num_experts):
        raise ValueError("--baseline hf covers the dense families (GPT-2, Qwen, Llama); "
                         "use --baseline naive for MoE and MLA models")
    if isinstance(model, GPT2):
        c = model.config
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, activation_function=c.activation))
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in model.state_dict().items()}
    else:
        hf = _qwen_family_hf_model(model.config)
        state = _unfuse_qwen_state_dict(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith("attn.bias") for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.to(device=loaded.device, dtype=loaded.dtype).eval()


def _qwen_family_hf_model(c) -> torch.nn.Module:
    import transformers

    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                  rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings)
    if c.qk_norm:
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=c.head_dim))
    if c.qkv_bias:
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, head_dim=c.head_dim))


def _unfuse_qwen_state_dict(model) -> dict[str, torch.Tensor]:
    c, out = model.config, {}
    q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    for key, value in model.state_dict().items():
        if ".qkv_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split([q_size, kv_size, kv_size])):
                out[key.replace("qkv_proj", name)] = part
        elif ".gate_up_proj." in key:
            for name, part in zip(("gate_proj", "up_proj"), value.chunk(2)):
                out[key.replace("gate_up_proj", name)] = part
        else:
            out[key] = value
    return out
