"""Weight-only int8 (`--quantization int8`): the quantizer, the int8 kernel against exact math on
the same int8 weights, the layer against the fp32 layer it replaces, and the engine's invariants
on a quantized model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from models.cpu_kernels import can_build
from models.fast_linear import linear_gelu_tanh
from models.loader import load_model
from models.quantization import Int8Embedding, Int8Linear, int8_kernel, quantize_int8, quantize_linear_layers
from server.config import EngineConfig
from server.engine.engine import Engine
from tests.test_engine import greedy, make_prompts

ROOT = Path(__file__).resolve().parents[1]


def has_avx512_bf16() -> bool:
    return "avx512_bf16" in open("/proc/cpuinfo").read()


needs_kernel = pytest.mark.skipif(not (can_build() and has_avx512_bf16()), reason="needs AVX512-BF16 and a compiler")


def _linear(in_features: int, out_features: int, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    return torch.nn.Linear(in_features, out_features, bias=bias)


def _exact(x: torch.Tensor, layer: Int8Linear, linear: torch.nn.Linear) -> torch.Tensor:
    """(x @ q^T) * s + b in fp64 from the layer's own int8 weight: what both paths approximate
    only by rounding their output."""
    q, scale = quantize_int8(linear.weight)
    assert torch.equal(layer.int8_weight(), q)  # the blocked layout holds exactly the quantized weight
    y = (x.double() @ q.double().T) * scale.double()
    return y if linear.bias is None else y + linear.bias.detach().double()


def test_quantize_int8_rounds_each_weight_to_its_channels_grid():
    w = torch.randn(40, 64) * torch.logspace(-3, 1, 40)[:, None]  # channels of very different size
    w[7] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert q.abs().max() <= 127 and torch.equal(q.abs().amax(dim=1)[torch.arange(40) != 7], torch.full((39,), 127, dtype=torch.int8))
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[7], torch.zeros(64, dtype=torch.int8))


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 31, 32, 64])
@pytest.mark.parametrize("shape,bias", [((64, 96), True), ((96, 100), False), ((768, 2304), True)])
def test_int8_linear_equals_exact_int8_math(use_kernel, rows, shape, bias):
    """Both paths, at row counts across the kernel's row tile (6) and widening hand-over (12),
    with N padded to whole 64-column blocks (100): within bf16 rounding of the exact result."""
    linear = _linear(*shape, bias=bias).to(torch.bfloat16)
    layer = Int8Linear(linear, use_kernel=use_kernel)
    assert (layer.kernel is not None) == use_kernel
    x = torch.randn(rows, shape[0]).to(torch.bfloat16)
    expected = _exact(x, layer, linear)
    tolerance = dict(atol=1e-2 * expected.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(layer(x).double(), expected, **tolerance)
    torch.testing.assert_close(linear_gelu_tanh(layer, x).double(), F.gelu(expected, approximate="tanh"), **tolerance)


@needs_kernel
def test_kernel_rows_do_not_depend_on_their_batch():
    """Row r of a batch is bit-identical to row r alone, in both kernel paths (in registers up to 12
    rows, through the widened scratch beyond): what keeps greedy output batch-invariant."""
    layer = Int8Linear(_linear(768, 3072).to(torch.bfloat16))
    x = torch.randn(40, 768).to(torch.bfloat16)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(40)])
    assert torch.equal(layer(x), alone) and torch.equal(layer(x[:9]), alone[:9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_close_to_the_float_layer(dtype):
    """Against the unquantized fp32 layer: per-channel int8 keeps ~0.4% of relative error (GPT-2's
    MLP shape, activations of unit size); stated bound 1.5% on the output's norm."""
    linear = _linear(768, 3072)
    layer = Int8Linear(linear.to(dtype))
    x = torch.randn(8, 768)
    expected = linear.float()(x).detach()
    error = (layer(x.to(dtype)).float() - expected).norm() / expected.norm()
    assert error < 0.015, error


def test_tied_embedding_reads_the_quantized_head():
    """GPT-2 ties wte to lm_head: after quantizing, the embedding reads int8 rows times their
    scale, and the table is stored once."""
    loaded = load_model("random:tiny-gpt2", dtype="bfloat16", device="cpu")
    model = loaded.model
    table = model.transformer.wte.weight.detach().clone()
    quantize_linear_layers(model, "int8")
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.transformer.wte, Int8Embedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    ids = torch.tensor([[0, 5, table.shape[0] - 1], [3, 3, 64]])
    q, scale = quantize_int8(table)
    expected = (q[ids].float() * scale[ids, None]).to(torch.bfloat16)
    assert torch.equal(model.transformer.wte(ids), expected)
    assert (model.transformer.wte(ids).float() - table[ids].float()).abs().max() <= scale.max() / 2 + 1e-2


def test_unknown_method_is_refused():
    loaded = load_model("random:tiny-gpt2", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize_linear_layers(loaded.model, "int3")


# ---- the engine on a quantized model --------------------------------------------------------

def _quantized_engine(name: str, fast_kernels: bool = True, **config) -> Engine:
    loaded = load_model(name, dtype="bfloat16", device="cpu")
    return Engine(loaded, EngineConfig(quantization="int8", fast_kernels=fast_kernels, **config))


@needs_kernel
def test_kernel_and_reference_path_give_the_same_greedy_tokens():
    """The same quantized model through the int8 kernel and through the PyTorch reference."""
    prompts = make_prompts(4, seed=3)
    outputs = [[c[0].token_ids for c in _quantized_engine("random:tiny-qwen2", fast, num_kv_blocks=64,
                                                           block_size=4).generate(prompts, greedy())]
               for fast in (False, True)]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("name,config", [
    ("random:tiny-gpt2", dict(num_kv_blocks=256, block_size=4, enable_prefix_caching=True)),
    ("random:tiny-gpt2", dict(num_kv_blocks=256, block_size=4, enable_prefix_caching=False)),
    ("random:tiny-qwen3", dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64)),  # preempts
])
def test_engine_invariants_hold_on_an_int8_model(name, config):
    """Greedy output alone equals output in a batch, with and without prefix caching and under
    preemption; no KV block leaks."""
    engine = _quantized_engine(name, **config)
    assert any(isinstance(m, Int8Linear) for m in engine.runner.model.modules())
    prompts = make_prompts(12, seed=1)
    alone = [engine.generate([p], greedy())[0][0].token_ids for p in prompts]
    batched = [c[0].token_ids for c in engine.generate(prompts, greedy())]
    assert batched == alone
    again = [c[0].token_ids for c in engine.generate(prompts[::-1], greedy())][::-1]  # cached prefixes, if on
    assert again == alone
    if config.get("num_kv_blocks") == 24:
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_quantized_model_has_half_the_weight_bytes():
    loaded = load_model("random:gpt2", dtype="bfloat16", device="cpu", overrides={"layers": "2"})
    before = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    quantize_linear_layers(loaded.model, "int8")
    after = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert 0.45 < after / before < 0.56, (before, after)  # int8 linears + fp32 scales; norms and wpe stay


def test_kernel_is_available_where_the_cpu_has_avx512_bf16():
    if can_build() and has_avx512_bf16():
        assert int8_kernel() is not None


# ---- serving ---------------------------------------------------------------------------------

def test_server_serves_an_int8_model_chosen_by_environment():
    """NANOSERVE_QUANTIZATION (what compose sets) quantizes at load; the OpenAI client gets its
    completion and /server_info says how the weights are stored."""
    from tests.api_fixtures import TINY_MODEL, assert_idle, run_server

    with run_server("--dtype", "bfloat16", env={"NANOSERVE_QUANTIZATION": "int8"}) as server:
        assert httpx.get(server.url + "/server_info").json()["quantization"] == "int8"
        completion = server.openai().completions.create(model=TINY_MODEL, prompt="int8 weights", max_tokens=6,
                                               temperature=0, extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
        assert_idle(server)


def test_an_unknown_method_ends_the_cli_with_one_sentence():
    done = subprocess.run([sys.executable, "-m", "server", "--model", "random:tiny-gpt2", "--quantization", "int3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "'int3' is not one of none, int8" in done.stderr and "Traceback" not in done.stderr
