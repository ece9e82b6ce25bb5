"""Architecture knobs: `--override layers=4,kv_heads=1,...` on a random preset's shape.

Knob names are the same for every family and map to each config's own field; an unknown knob,
a value of the wrong type or an inconsistent shape (heads not dividing the width, KV heads not
dividing heads, an odd RoPE width, ...) is refused before any tensor is built, in one sentence
that names the knob and the rule. On a real checkpoint only `layers` applies (it keeps the first
N layers).
"""
from __future__ import annotations

import dataclasses

from models.deepseek import DeepseekConfig
from models.gpt2 import GPT2Config
from models.qwen import QwenConfig

CONFIGS = {"gpt2": GPT2Config, "qwen": QwenConfig, "deepseek": DeepseekConfig}
KNOBS: dict[str, dict[str, str]] = {  # knob -> config field, per family
    "gpt2": dict(layers="n_layer", heads="n_head", hidden="n_embd", vocab="vocab_size", max_positions="n_positions"),
    "qwen": dict(layers="num_hidden_layers", heads="num_attention_heads", kv_heads="num_key_value_heads",
                 hidden="hidden_size", intermediate="intermediate_size", head_dim="head_dim", rope_theta="rope_theta",
                 vocab="vocab_size", tie_embeddings="tie_word_embeddings", max_positions="max_position_embeddings",
                 experts="num_experts", experts_per_token="num_experts_per_tok",
                 expert_intermediate="moe_intermediate_size"),
    "deepseek": dict(layers="num_hidden_layers", heads="num_attention_heads", hidden="hidden_size",
                     intermediate="intermediate_size", kv_lora_rank="kv_lora_rank", q_lora_rank="q_lora_rank",
                     rope_dim="qk_rope_head_dim", nope_dim="qk_nope_head_dim", v_head_dim="v_head_dim",
                     rope_theta="rope_theta", vocab="vocab_size", tie_embeddings="tie_word_embeddings",
                     max_positions="max_position_embeddings", experts="n_routed_experts",
                     experts_per_token="num_experts_per_tok", shared_experts="n_shared_experts",
                     expert_intermediate="moe_intermediate_size", dense_layers="first_k_dense_replace"),
}


def parse_overrides(text: str | None) -> dict[str, str]:
    """'layers=4,heads=8' -> {'layers': '4', 'heads': '8'}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        knob, sep, value = item.partition("=")
        if not sep or not knob.strip() or not value.strip():
            raise ValueError(f"--override item {item!r} is not knob=value (e.g. layers=4,kv_heads=1)")
        out[knob.strip()] = value.strip()
    return out


def apply_overrides(family: str, shape: dict, overrides: dict[str, str]) -> dict:
    """The preset's shape with the knobs applied, checked for consistency; raises ValueError."""
    knobs = KNOBS[family]
    fields = {f.name: f for f in dataclasses.fields(CONFIGS[family])}
    merged = {name: f.default for name, f in fields.items() if f.default is not dataclasses.MISSING}
    merged.update(shape)
    for knob, text in overrides.items():
        if knob not in knobs:
            raise ValueError(f"unknown knob {knob!r} for {family} models; choose from {', '.join(sorted(knobs))}")
        merged[knobs[knob]] = _parse_value(knob, text, fields[knobs[knob]].default)
    _check(family, merged, {field: knob for knob, field in knobs.items()})
    return {**shape, **{knobs[k]: merged[knobs[k]] for k in overrides}}


def _parse_value(knob: str, text: str, default) -> int | float | bool | None:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{knob} must be true or false, not {text!r}")
        return text.lower() in ("true", "1")
    if knob == "q_lora_rank" and text.lower() == "none":
        return None
    try:
        return float(text) if isinstance(default, float) else int(text)
    except ValueError:
        raise ValueError(f"{knob} must be a {'number' if isinstance(default, float) else 'whole number'}, not {text!r}") from None


def _check(family: str, c: dict, name_of: dict[str, str]) -> None:
    """One sentence naming the knob and the rule, for the first inconsistency found."""
    def fail(field: str, rule: str) -> None:
        raise ValueError(f"{name_of.get(field, field)}={c[field]}: {rule}")

    for field, value in c.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0 and field in name_of \
                and not (field in ("first_k_dense_replace", "num_experts", "n_shared_experts") and value == 0):
            fail(field, "must be positive")
    if family == "gpt2":
        if c["n_embd"] % c["n_head"]:
            fail("n_head", f"must divide hidden ({c['n_embd']}) into equal heads")
        return
    heads = c["num_attention_heads"]
    if family == "qwen":
        if c.get("head_dim") is None and c["hidden_size"] % heads:
            fail("num_attention_heads", f"must divide hidden ({c['hidden_size']}) into equal heads, or set head_dim")
        if heads % c["num_key_value_heads"]:
            fail("num_key_value_heads", f"must divide heads ({heads}): each KV head serves a whole group of query heads")
        if (c.get("head_dim") or c["hidden_size"] // heads) % 2:
            fail("head_dim" if c.get("head_dim") else "num_attention_heads", "gives an odd head dim; RoPE rotates pairs")
        if c["num_experts"] and c["num_experts_per_tok"] > c["num_experts"]:
            fail("num_experts_per_tok", f"exceeds the {c['num_experts']} experts")
        return
    if c["qk_rope_head_dim"] % 2:
        fail("qk_rope_head_dim", "must be even; RoPE rotates pairs")
    if c["num_experts_per_tok"] > c["n_routed_experts"]:
        fail("num_experts_per_tok", f"exceeds the {c['n_routed_experts']} experts")
    if c["n_routed_experts"] % c["n_group"]:
        fail("n_routed_experts", f"must split evenly into the preset's {c['n_group']} expert groups")
