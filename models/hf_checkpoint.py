"""Hugging Face checkpoint directories: config.json + *.safetensors (sharded too) -> our modules.

Loading is a copy with a short list of exceptions:
  - GPT-2: Conv1D weights are stored (in, out) and are transposed; the attention mask buffers
    (`attn.bias`, `attn.masked_bias`) are skipped; keys may lack the `transformer.` prefix.
  - Qwen / Llama: q, k, v are fused into `qkv_proj`, gate and up into `gate_up_proj`.
  - Tied embeddings: `lm_head.weight` may be absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from models.gpt2 import GPT2, GPT2Config
from models.qwen import QwenConfig, QwenModel
from models.state_dict import load_state_dict

SUPPORTED_MODEL_TYPES = ("gpt2", "qwen2", "qwen3", "llama")
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


def hf_to_qwen_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, pending = {}, {}
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if any(f".{p}." in key for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
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
    convert = hf_to_gpt2_state_dict if config["model_type"] == "gpt2" else hf_to_qwen_state_dict
    load_state_dict(model, convert(tensors))
    if (path / "tokenizer.json").is_file():
        tokenizer = tokenizer_from_hf_dir(path)
    elif config["model_type"] == "gpt2":
        tokenizer = gpt2_tokenizer()
    elif config["model_type"] in ("qwen2", "qwen3"):
        tokenizer = qwen_tokenizer()
    else:
        raise FileNotFoundError(f"{path} has no tokenizer.json; save the tokenizer next to the weights")
    return model, tokenizer, max_len
