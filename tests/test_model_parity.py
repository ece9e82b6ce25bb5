"""Our models against Hugging Face transformers on tiny random checkpoints, logit by logit.

Each checkpoint goes through our loader (safetensors dir, GGUF, nanoGPT ckpt) and is compared
on a full forward, on the paged-cache path (chunked prefill, then one token at a time) and on
20 greedy tokens.
"""
from __future__ import annotations

import pytest
import torch

from models.builtin import builtin_model_path
from models.loader import load_model
from tests.gguf_writer import write_gguf
from tests.model_helpers import cached_logits

FAMILIES = ["gpt2", "qwen2", "qwen3", "llama"]
ATOL = 2e-4


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids], device=hf_model.device)).logits[0].float()


def hf_greedy(hf_model, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        ids_t = torch.tensor([ids], device=hf_model.device)
        out = hf_model.generate(ids_t, attention_mask=torch.ones_like(ids_t),
                                max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def prompt_ids(vocab_size: int, n: int = 23, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_parity(model, hf_model, vocab_size: int) -> None:
    ids = prompt_ids(vocab_size)
    expected = hf_logits(hf_model, ids + prompt_ids(vocab_size, 9, seed=1))
    full = model.full_logits(ids + prompt_ids(vocab_size, 9, seed=1))
    torch.testing.assert_close(full, expected, atol=ATOL, rtol=1e-4)
    for chunk in (None, 5):
        paged = cached_logits(model, ids, prompt_ids(vocab_size, 9, seed=1), block_size=4, chunk=chunk)
        torch.testing.assert_close(paged, expected, atol=ATOL, rtol=1e-4)
    assert model.generate(ids, 20) == hf_greedy(hf_model, ids, 20)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_directory_parity(hf_checkpoints, family):
    path, hf_model = hf_checkpoints[family]
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert loaded.max_model_len == 256
    assert_parity(loaded.model, hf_model, hf_model.config.vocab_size)


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """Tiny Llama / Qwen2 / Qwen3 HF models written as GGUF files (SmolLM2 vocabulary)."""
    import transformers

    from tests.conftest import TINY

    torch.manual_seed(2)
    root = tmp_path_factory.mktemp("gguf")
    vocab = dict(vocab_size=49152)
    models = {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **vocab, tie_word_embeddings=True)),
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **vocab, tie_word_embeddings=False)),
        "qwen3": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, **vocab, head_dim=32, tie_word_embeddings=True)),
    }
    out = {}
    for arch, model in models.items():
        model.eval()
        write_gguf(root / f"{arch}.gguf", model, arch, str(builtin_model_path("smollm2-135m-instruct")))
        out[arch] = (root / f"{arch}.gguf", model)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_parity(gguf_models, arch):
    path, hf_model = gguf_models[arch]
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert_parity(loaded.model, hf_model, 49152)
    assert loaded.tokenizer.encode("Hello world") == loaded.tokenizer.encode("Hello world")


def test_gguf_llama_without_unpermute_is_wrong(gguf_models, monkeypatch):
    """The q/k un-permutation is load-bearing: skipping it changes the logits."""
    from models import gguf_checkpoint

    path, hf_model = gguf_models["llama"]
    monkeypatch.setattr(gguf_checkpoint, "_unpermute_llama_qk", lambda tensors, config: None)
    loaded = load_model(str(path), dtype="float32", device="cpu")
    ids = prompt_ids(49152)
    assert not torch.allclose(loaded.model.full_logits(ids), hf_logits(hf_model, ids), atol=1e-3)


def test_gguf_q8_0_dequantizes_close(gguf_models, tmp_path):
    _, hf_model = gguf_models["qwen2"]
    path = tmp_path / "q8.gguf"
    write_gguf(path, hf_model, "qwen2", str(builtin_model_path("smollm2-135m-instruct")), quantize_ffn=True)
    loaded = load_model(str(path), dtype="float32", device="cpu")
    ids = prompt_ids(49152)
    torch.testing.assert_close(loaded.model.full_logits(ids), hf_logits(hf_model, ids), atol=5e-3, rtol=0)


def test_nanogpt_checkpoint_parity(nanogpt_checkpoint):
    """nanoGPT ckpt.pt (with _orig_mod. prefixes) against HF GPT-2 with exact GELU."""
    import transformers

    root, reference = nanogpt_checkpoint
    c = reference.config
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_positions,
        vocab_size=c.vocab_size, activation_function="gelu")).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in reference.state_dict().items()}
    hf_model.load_state_dict(state, strict=False)
    loaded = load_model(str(root / "ckpt.pt"), dtype="float32", device="cpu")
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("hello world")) == "hello world"
    assert_parity(loaded.model, hf_model, c.vocab_size)


def test_random_presets_load_and_generate():
    for preset in ("tiny-gpt2", "tiny-qwen2", "tiny-qwen3"):
        loaded = load_model(f"random:{preset}", dtype="float32", device="cpu")
        ids = loaded.tokenizer.encode("Hello there")
        out = loaded.model.generate(ids, 4)
        assert len(out) == 4
        torch.testing.assert_close(cached_logits(loaded.model, ids, out), loaded.model.full_logits(ids + out),
                                   atol=ATOL, rtol=1e-4)
    again = load_model("random:tiny-gpt2", dtype="float32", device="cpu")
    first = load_model("random:tiny-gpt2", dtype="float32", device="cpu")
    assert torch.equal(again.model.lm_head.weight, first.model.lm_head.weight), "presets are seeded"


def test_bf16_paged_path_close_to_fp32(hf_checkpoints):
    path, _ = hf_checkpoints["qwen3"]
    fp32 = load_model(str(path), dtype="float32", device="cpu").model
    bf16 = load_model(str(path), dtype="bfloat16", device="cpu").model
    ids = prompt_ids(151936, 30)
    torch.testing.assert_close(cached_logits(bf16, ids[:20], ids[20:]), fp32.full_logits(ids), atol=0.05, rtol=0.05)
