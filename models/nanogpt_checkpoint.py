"""nanoGPT checkpoints: `ckpt.pt` from nanoGPT's train.py -> our GPT-2 module.

The file holds `model_args` (n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout)
and `model`, a state dict whose keys carry `_orig_mod.` when the model was compiled. nanoGPT
uses nn.Linear (no Conv1D transpose) and exact GELU. A `meta.pkl` beside the checkpoint means a
character-level vocabulary; otherwise the GPT-2 BPE is used.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from models.gpt2 import GPT2, GPT2Config
from models.state_dict import load_state_dict


def load_nanogpt(path: Path) -> tuple[GPT2, "Tokenizer", int]:
    """Model, tokenizer and context length from a ckpt.pt file (or the folder holding it)."""
    from models.tokenizer import char_tokenizer, gpt2_tokenizer

    ckpt_file = path / "ckpt.pt" if path.is_dir() else path
    try:
        checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"{ckpt_file} is not a readable nanoGPT checkpoint ({e})") from e
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{ckpt_file} lacks 'model_args' and 'model'; expected a ckpt.pt written by nanoGPT's train.py")
    args = checkpoint["model_args"]
    config = GPT2Config(
        vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
        n_layer=args["n_layer"], n_head=args["n_head"], bias=args.get("bias", True), activation="gelu",
    )
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".attn.bias")}
    with torch.device("meta"):
        model = GPT2(config)
    load_state_dict(model, state_dict)
    meta_file = ckpt_file.parent / "meta.pkl"
    if meta_file.is_file():
        with open(meta_file, "rb") as f:
            tokenizer = char_tokenizer(pickle.load(f))
    else:
        tokenizer = gpt2_tokenizer()
    return model, tokenizer, config.n_positions
