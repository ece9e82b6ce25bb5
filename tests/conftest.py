"""Fixtures: tiny random checkpoints of every family, written to disk, never downloaded."""
from __future__ import annotations

import pickle

import pytest
import torch

def pytest_sessionstart(session) -> None:
    """Build every C++ kernel once, before any test starts a server. A server that has to build
    them spends its health-check budget compiling (minutes on a 2-core machine), and a server
    stopped mid-build leaves torch's build lock behind, on which every later server then waits."""
    from models.cpu_kernels import KERNELS, can_build, load_kernel

    if can_build():
        for name, source in KERNELS.items():
            load_kernel(name, source)  # a failed build is test_cpu_kernels' to report


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _save(model, path):
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def tiny_llama_tokenizer_json(path) -> None:
    """A small byte-level BPE trained on a few sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (directory, HF model) for tiny GPT-2, Qwen2, Qwen3 and Llama checkpoints."""
    import transformers

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    models = {
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=4, n_embd=64, n_positions=256, vocab_size=50257)),
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **TINY, vocab_size=151936, tie_word_embeddings=False)),
        "qwen3": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **TINY, head_dim=32, vocab_size=151936, tie_word_embeddings=True)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **TINY, vocab_size=300, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0})),
    }
    out = {}
    for name, model in models.items():
        path = _save(model, root / name)
        if name == "llama":
            tiny_llama_tokenizer_json(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="session")
def nanogpt_checkpoint(tmp_path_factory):
    """A nanoGPT-format ckpt.pt (compiled-model key prefixes) with a char-level meta.pkl."""
    from models.gpt2 import GPT2, GPT2Config
    from models.presets import init_weights

    torch.manual_seed(1)
    chars = sorted(set("hello world, nanoserve!\n"))
    config = GPT2Config(vocab_size=len(chars), n_positions=64, n_embd=48, n_layer=2, n_head=3, activation="gelu")
    model = GPT2(config)
    init_weights(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, 0.0, 0.02)
    root = tmp_path_factory.mktemp("nanogpt")
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["_orig_mod.lm_head.weight"] = model.lm_head.weight
    model_args = dict(n_layer=2, n_head=3, n_embd=48, block_size=64, bias=True, vocab_size=len(chars), dropout=0.0)
    torch.save({"model_args": model_args, "model": state, "iter_num": 10, "best_val_loss": 1.0,
                "config": {"dataset": "shakespeare_char"}}, root / "ckpt.pt")
    with open(root / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return root, model
