"""The LM head writes float32 logits: every linear kernel can store its float32 sums unrounded
(`float_output`), and the LM head (`models.layers.LMHead`) takes that path. bf16 logits near 20
sit 0.125 apart, so close candidates tie and greedy picks the lower id; on an AMX CPU that flipped the
default model's answer to "What is the capital of France?" between a cold and a prefix-cached
prefill (tests/test_api_chat.py::test_default_model_names_paris)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.cpu_kernels import load_kernel
from models.fast_linear import PAIRS32_LAYOUT, PackedLinear, small_batch_kernels
from models.layers import Linear, LMHead
from models.loader import load_model
from models.quantized_linear import (Int4Linear, Int8GroupLinear, Int8Linear, int4_avx2_kernel, int4_kernel,
                                     int8_avx2_kernel, int8_group_avx2_kernel, int8_group_kernel, int8_kernel)
from server.config import EngineConfig
from server.engine.engine import Engine

ROWS = (1, 5, 7, 16, 17, 33)  # register tiles of 3 and 6 rows, AMX tiles of 16, two 32-row passes


def _assert_unrounded(unrounded: torch.Tensor, rounded: torch.Tensor, exact: torch.Tensor) -> None:
    """float32 output: rounds to the bf16 output's very bits (one epilogue, the last store
    differs), and sits closer to the exact product than bf16 can."""
    assert unrounded.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(unrounded.to(torch.bfloat16), rounded)
    assert not torch.equal(unrounded, rounded.float())  # really not on the bf16 grid
    err_unrounded = (unrounded.double() - exact).abs().max().item()
    err_rounded = (rounded.double() - exact).abs().max().item()
    assert err_unrounded < err_rounded / 4, (err_unrounded, err_rounded)


def _bf16_input(rows: int, in_features: int) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)


@pytest.mark.parametrize("rows", ROWS)
def test_each_bf16_kernel_writes_its_sums_unrounded(rows):
    """The small-batch kernels this CPU runs on oneDNN's buffer (AMX or AVX512-BF16) and the AVX2
    kernel on its own layout; N = 100 leaves a partial block."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 100).to(torch.bfloat16)
    x = _bf16_input(rows, 256)
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    bias_f32 = linear.bias.detach().float()
    ran = 0
    kernels = [(k.name, k.layout, k.linear) for k in small_batch_kernels()]  # AMX also builds AVX512-BF16
    avx2 = load_kernel("nanoserve_bf16_avx2_linear", "bf16_avx2_linear.cpp")
    if avx2 is not None and avx2.bf16_avx2_available():
        kernels.append(("AVX2", PAIRS32_LAYOUT, avx2.bf16_avx2_linear))
    for name, layout, kernel in kernels:  # each on the layout it reads, laid out here
        weight = layout.order(linear.weight.detach()).contiguous()
        run = lambda **kw: kernel(x, weight.data_ptr(), weight.numel() * 2, bias_f32, 100, 0, **kw)  # noqa: E731
        try:
            _assert_unrounded(run(float_output=True), run(), exact)
        except AssertionError as error:
            raise AssertionError(name) from error
        ran += 1
    if not ran:
        pytest.skip("no bf16 linear kernel built on this CPU")


def _quantized_layers(linear: torch.nn.Linear):
    """(name, layer, kernel) for each quantized format and each kernel this CPU builds for it."""
    n, k = linear.out_features, linear.in_features
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    q8_scale = (torch.rand(n, k // 32, generator=torch.Generator().manual_seed(2)) * 1e-2 + 1e-4).half()
    layers = [("int8", Int8Linear(linear, use_kernel=False), (int8_kernel(), int8_avx2_kernel())),
              ("q8_0", Int8GroupLinear(linear, 32, (q8, q8_scale), use_kernel=False),
               (int8_group_kernel(), int8_group_avx2_kernel())),
              ("int4-g32", Int4Linear(linear, 32, use_kernel=False), (int4_kernel(), int4_avx2_kernel()))]
    for name, layer, kernels in layers:
        for kernel in dict.fromkeys(k for k in kernels if k is not None):  # AVX512-BF16 and AVX2, once each
            yield f"{name}/{kernel.__name__}", layer, kernel


@pytest.mark.parametrize("rows", ROWS)
def test_each_quantized_kernel_writes_its_sums_unrounded(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 100)
    x = _bf16_input(rows, 256)
    ran = []
    for name, layer, kernel in _quantized_layers(linear):
        exact = F.linear(x.double(), layer.dequantize().double(), layer.bias.double())
        layer.kernel = kernel
        try:
            _assert_unrounded(layer.forward_float32(x), layer(x), exact)
        except AssertionError as error:
            raise AssertionError(name) from error
        ran.append(name)
    if not ran:
        pytest.skip("no quantized linear kernel built on this CPU")


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 64, 70])
def test_a_packed_head_gives_a_row_the_same_float32_logits_alone_and_in_any_batch(rows):
    """Up to the kernel's `head_rows` (every row count on AMX, where one pass over the weight
    per 32 rows is as fast as oneDNN; 32 on AVX512-BF16) the head adds no batch dependence of its
    own; past them oneDNN's bf16 output is widened."""
    torch.manual_seed(0)
    head = LMHead(128, 1000, bias=False).to(torch.bfloat16)
    exact_weight = head.weight.detach().double()
    packed = PackedLinear(head)
    if packed.kernel is None:
        pytest.skip("no small-batch kernel reads this CPU's packed layout (oneDNN's output is widened)")
    head.use_kernel(packed)
    x = _bf16_input(rows, 128)
    logits = head(x)  # (rows, 1000)
    assert logits.dtype == torch.float32 and logits.shape == (rows, 1000)
    if rows > packed.kernel.head_rows:
        onednn = torch.ops.mkldnn._linear_pointwise(x, packed.packed_weight, None, "none", [], "")
        assert torch.equal(logits, onednn.float())
        return
    for row in {0, rows // 2, rows - 1}:
        assert torch.equal(head(x[row:row + 1])[0], logits[row]), f"row {row}"
    torch.testing.assert_close(logits.double(), x.double() @ exact_weight.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("spec", ["random:tiny-gpt2", "random:tiny-qwen2"])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_models_compute_float32_logits(spec, quantization):
    """GPT-2's and the Qwen family's heads are LMHeads: an engine's logits are float32, and off
    the bf16 grid wherever a kernel runs the head."""
    engine = Engine(load_model(spec, dtype="bfloat16", device="cpu"),
                    EngineConfig(num_kv_blocks=16, quantization=quantization))
    model = engine.runner.model
    assert isinstance(model.lm_head, LMHead)
    hidden = _bf16_input(3, model.lm_head.in_features)
    logits = model.compute_logits(hidden)  # (3, V)
    assert logits.dtype == torch.float32 and logits.shape[0] == 3
    if model.lm_head.kernel is not None and getattr(model.lm_head.kernel, "kernel", None) is not None:
        assert not torch.equal(logits, logits.to(torch.bfloat16).float())


def test_a_head_without_a_kernel_widens_its_output():
    """Without a kernel (the reference path, CUDA) the head is linear(x).float()."""
    head = LMHead(16, 8).to(torch.bfloat16)
    x = _bf16_input(3, 16)
    assert torch.equal(head(x), Linear.forward(head, x).float())


@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
def test_a_quantized_head_without_a_kernel_computes_in_float32(fmt):
    """The reference path of a quantized head: float32 from the dequantized weight."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40)
    layer = Int8Linear(linear, use_kernel=False) if fmt == "int8" else Int4Linear(linear, 32, use_kernel=False)
    x = _bf16_input(3, 64)
    logits = layer.forward_float32(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(x.float(), layer.dequantize(), layer.bias), atol=1e-5, rtol=1e-5)
