"""Copy a checkpoint's tensors into a freshly built model, checking names and shapes."""
from __future__ import annotations

import torch

from models.base import CausalLM


def load_state_dict(model: CausalLM, state_dict: dict[str, torch.Tensor]) -> CausalLM:
    """Copy weights into a meta-device model, checking key sets and shapes, then re-tie."""
    expected = {k: p.shape for k, p in model.state_dict().items()}
    tied = getattr(model.lm_head, "weight") is _embedding(model).weight
    if tied:
        expected.pop("lm_head.weight", None)
        state_dict.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if state_dict[key].shape != shape:
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(state_dict[key].shape)}, expected {tuple(shape)}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.lm_head.weight = _embedding(model).weight
    return model


def _embedding(model: CausalLM) -> torch.nn.Embedding:
    return model.transformer.wte if hasattr(model, "transformer") else model.model.embed_tokens
