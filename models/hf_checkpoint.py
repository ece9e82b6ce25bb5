"""Hugging Face checkpoint directories: config.json + *.safetensors (sharded too) -> our modules.

Loading is a copy with a short list of exceptions:
  - GPT-2: Conv1D weights are stored (in, out) and are transposed; the attention mask buffers
    (`attn.bias`, `attn.masked_bias`) are skipped; keys may lack the `transformer.` prefix.
  - Qwen / Llama: q, k, v are fused into `qkv_proj`, gate and up into `gate_up_proj`.
  - MoE (Qwen3-MoE, DeepSeek): per-expert `experts.{e}.{gate,up,down}_proj` are stacked into
    `experts.gate_up_proj` (E, 2I, C) and `experts.down_proj` (E, C, I).
  - DeepSeek: the RoPE rows of the q and kv_a projections are permuted from interleaved pairs
    to halves (models/deepseek.py says why).
  - Tied embeddings: `lm_head.weight` may be absent.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from models.deepseek import DeepseekConfig, DeepseekModel
from models.gpt2 import GPT2, GPT2Config
from models.qwen import QwenConfig, QwenModel
from models.state_dict import load_state_dict

SUPPORTED_MODEL_TYPES = ("gpt2", "qwen2", "qwen3", "qwen3_moe", "llama", "deepseek_v2", "deepseek_v3")
EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_hf_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face model directory, a .gguf file or a nanoGPT ckpt.pt")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} in {config_file} is not supported; nanoserve runs {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def build_model_from_hf_config(config: dict) -> tuple[torch.nn.Module, int]:
    """An empty (meta-device) model for an HF config, and its context length."""
    if config["model_type"] == "gpt2":
        cfg = GPT2Config(
            vocab_size=config["vocab_size"], n_positions=config.get("n_positions", 1024),
            n_embd=config["n_embd"], n_layer=config["n_layer"], n_head=config["n_head"],
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
            activation="gelu" if config.get("activation_function") == "gelu" else "gelu_new",
        )
        with torch.device("meta"):
            return GPT2(cfg), cfg.n_positions
    if config["model_type"].startswith("deepseek"):
        ds = DeepseekConfig.from_hf(config)
        with torch.device("meta"):
            return DeepseekModel(ds), ds.max_position_embeddings
    cfg = QwenConfig.from_hf(config)
    with torch.device("meta"):
        return QwenModel(cfg), cfg.max_position_embeddings


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, with a progress bar."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files; save the model with save_pretrained(safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc="loading shards", unit="shard", disable=len(files) < 2):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e}); re-download or re-save it") from e
    return tensors


def hf_to_gpt2_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        if key.endswith(("attn.bias", "attn.masked_bias")) and value.dim() > 1:
            continue  # causal-mask buffers, not weights
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        if key.endswith(GPT2_CONV1D):
            value = value.t()  # Conv1D stores (in, out)
        out[key] = value
    return out


def stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """experts.{e}.gate/up/down_proj (E of each) -> experts.gate_up_proj (E, 2I, C), experts.down_proj (E, C, I)."""
    out, experts = {}, {}
    for key, value in tensors.items():
        match = EXPERT_KEY.match(key)
        if match:
            prefix, index, proj = match.groups()
            experts.setdefault(prefix, {}).setdefault(int(index), {})[proj] = value
        else:
            out[key] = value
    for prefix, by_index in experts.items():
        ordered = [by_index[i] for i in range(len(by_index))]
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat((e["gate_proj"], e["up_proj"])) for e in ordered])
        out[f"{prefix}.down_proj"] = torch.stack([e["down_proj"] for e in ordered])
    return out


def deinterleave_rope_rows(tensors: dict[str, torch.Tensor], config: DeepseekConfig) -> dict[str, torch.Tensor]:
    """Reorder the RoPE output rows of q and kv_a from pairs (x0 x1)(x2 x3).. to halves (x0 x2 ..)(x1 x3 ..).

    Applied to q and k alike, the permutation leaves q.k unchanged and lets the interleaved
    rotation become the "rotate half" one of models/layers.py.
    """
    heads, rope = config.num_attention_heads, config.qk_rope_head_dim
    head_dim, latent = config.qk_nope_head_dim + rope, config.kv_lora_rank
    perm = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))  # (R,)
    out = dict(tensors)
    for key, value in tensors.items():
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            per_head = value.view(heads, head_dim, -1)  # (H, Dn + R, in)
            out[key] = torch.cat((per_head[:, :-rope], per_head[:, -rope:][:, perm]), dim=1).reshape(value.shape)
        elif key.endswith(("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias")):
            out[key] = torch.cat((value[:latent], value[latent:][perm]))
    return out


def drop_mtp_layers(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 checkpoints append multi-token-prediction layers (`model.layers.61.*` after 61
    layers): a speculative head outside the forward, skipped as transformers skips it."""
    layer = re.compile(r"model\.layers\.(\d+)\.")
    return {k: v for k, v in tensors.items() if not ((m := layer.match(k)) and int(m.group(1)) >= num_layers)}


def hf_to_qwen_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Also DeepSeek's: the same fusions (dense and shared-expert SwiGLU), experts stacked first."""
    out, pending = {}, {}
    tensors = stack_experts(tensors)
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        attention_qkv = any(f".{p}." in key for p in ("q_proj", "k_proj", "v_proj"))
        if (attention_qkv and re.sub(r"\.[qkv]_proj\.", ".k_proj.", key) in tensors  # DeepSeek's lone q_proj stays
                or any(f".{p}." in key for p in ("gate_proj", "up_proj"))):
            pending[key] = value
        else:
            out[key] = value
    for key in [k for k in pending if ".q_proj." in k]:
        parts = [pending.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[key.replace("q_proj", "qkv_proj")] = torch.cat(parts, dim=0)
    for key in [k for k in pending if ".gate_proj." in k]:
        parts = [pending.pop(key.replace("gate_proj", p)) for p in ("gate_proj", "up_proj")]
        out[key.replace("gate_proj", "gate_up_proj")] = torch.cat(parts, dim=0)
    assert not pending, f"unpaired projection weights: {sorted(pending)[:4]}"
    return out


def load_hf_dir(path: Path) -> tuple[torch.nn.Module, "Tokenizer", int]:
    """Model, tokenizer and context length from a Hugging Face checkpoint directory."""
    from models.tokenizer import gpt2_tokenizer, qwen_tokenizer, tokenizer_from_hf_dir

    config = read_hf_config(path)
    model, max_len = build_model_from_hf_config(config)
    tensors = read_safetensors(path)
    if config["model_type"] == "gpt2":
        state_dict = hf_to_gpt2_state_dict(tensors)
    else:
        state_dict = hf_to_qwen_state_dict(tensors)
        if config["model_type"].startswith("deepseek"):
            state_dict = drop_mtp_layers(state_dict, config["num_hidden_layers"])
            if config["model_type"] == "deepseek_v2" or config.get("rope_interleave", True):  # V2 always pairs
                state_dict = deinterleave_rope_rows(state_dict, model.config)
    load_state_dict(model, state_dict)
    if (path / "tokenizer.json").is_file():
        tokenizer = tokenizer_from_hf_dir(path)
    elif config["model_type"] == "gpt2":
        tokenizer = gpt2_tokenizer()
    elif config["model_type"] in ("qwen2", "qwen3", "qwen3_moe"):
        tokenizer = qwen_tokenizer()
    else:
        raise FileNotFoundError(f"{path} has no tokenizer.json; save the tokenizer next to the weights")
    return model, tokenizer, max_len
