"""`--override` architecture knobs: applied to random presets, refused in one sentence that names
the knob and the rule before any tensor is built, `layers` only on checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models import presets
from models.loader import ModelLoadError, load_model
from server.cli import main
from tests.api_fixtures import ROOT


def test_knobs_reshape_a_random_preset():
    loaded = load_model("random:tiny-qwen2", dtype="float32", device="cpu",
                        overrides={"layers": "3", "heads": "8", "kv_heads": "1", "head_dim": "16"})
    spec = loaded.model.kv_cache_spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (3, 1, 16)
    assert loaded.model.model.layers[0].self_attn.qkv_proj.out_features == (8 + 2 * 1) * 16
    assert len(loaded.model.generate([1, 2, 3], 3)) == 3
    moe = load_model("random:tiny-qwen2", dtype="float32", device="cpu", overrides={"experts": "4", "experts_per_token": "2"})
    assert type(moe.model.model.layers[0].mlp).__name__ == "SparseMoE"


@pytest.mark.parametrize("model, overrides, message", [
    ("random:tiny-qwen2", {"foo": "1"}, "unknown knob 'foo' for qwen models; choose from"),
    ("random:tiny-qwen2", {"layers": "x"}, "layers must be a whole number, not 'x'"),
    ("random:tiny-qwen2", {"rope_theta": "fast"}, "rope_theta must be a number"),
    ("random:tiny-qwen2", {"tie_embeddings": "maybe"}, "tie_embeddings must be true or false"),
    ("random:tiny-qwen2", {"layers": "0"}, "layers=0: must be positive"),
    ("random:tiny-qwen2", {"heads": "3"}, "heads=3: must divide hidden (64) into equal heads"),
    ("random:tiny-qwen2", {"kv_heads": "3"}, "kv_heads=3: must divide heads (4)"),
    ("random:tiny-qwen3", {"head_dim": "15"}, "head_dim=15: gives an odd head dim; RoPE rotates pairs"),
    ("random:tiny-qwen2", {"experts": "4", "experts_per_token": "8"}, "experts_per_token=8: exceeds the 4 experts"),
    ("random:tiny-qwen2", {"vocab": "100"}, "vocab=100: must be at least the tokenizer's"),
    ("random:tiny-gpt2", {"heads": "5"}, "heads=5: must divide hidden (64) into equal heads"),
    ("random:tiny-gpt2", {"kv_heads": "1"}, "unknown knob 'kv_heads' for gpt2 models"),
    ("random:tiny-deepseek-v3", {"rope_dim": "15"}, "rope_dim=15: must be even; RoPE rotates pairs"),
    ("random:tiny-deepseek-v3", {"experts": "7"}, "experts=7: must split evenly into the preset's 2 expert groups"),
    ("random:tiny-deepseek-v3", {"experts_per_token": "9"}, "experts_per_token=9: exceeds the 8 experts"),
])
def test_inconsistent_knobs_fail_before_any_tensor(monkeypatch, model, overrides, message):
    for name in ("GPT2", "QwenModel", "DeepseekModel"):
        monkeypatch.setattr(presets, name, lambda config: pytest.fail("a model was built"))
    with pytest.raises(ModelLoadError) as error:
        load_model(model, dtype="float32", device="cpu", overrides=overrides)
    assert message in str(error.value) and str(error.value).count(".") <= 2


def test_checkpoints_take_only_layers():
    loaded = load_model("smollm2-135m-instruct", dtype="float32", device="cpu", overrides={"layers": "2"})
    assert len(loaded.model.attention_layers()) == 2 and loaded.model.kv_cache_spec.num_layers == 2
    with pytest.raises(ModelLoadError, match="only layers= applies to a checkpoint"):
        load_model("smollm2-135m-instruct", dtype="float32", device="cpu", overrides={"heads": "3"})
    with pytest.raises(ModelLoadError, match="layers=31: a checkpoint of 30 layers keeps between 1 and 30"):
        load_model("smollm2-135m-instruct", dtype="float32", device="cpu", overrides={"layers": "31"})


def test_override_flag_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    main(["bench", "--model", "random:tiny-gpt2", "--override", "layers=1,heads=2", "--dtype", "float32",
          "--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--json", str(out)])
    assert json.loads(out.read_text())[0]["output_tokens_per_s"] > 0
    done = subprocess.run([sys.executable, "-m", "server.cli", "generate", "hi", "--model", "random:tiny-gpt2",
                           "--override", "layers"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not knob=value" in done.stderr and "Traceback" not in done.stderr
