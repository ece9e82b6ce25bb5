"""Weight-only int8 and 4-bit (`--quantization int8|int4[-gN]`): the quantizers, both paths of each
layer (kernel, PyTorch reference) against exact math on the same quantized weights, the layers
against the fp32 layers they replace, and the engine's invariants on quantized models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.cpu_kernels import can_build, load_kernel
from models.loader import load_model
from models.quantization import make_quantized, quantize_linear_layers
from models.quantized_linear import (Int4Linear, Int8GroupLinear, Int8Linear, QuantizedEmbedding, QuantizedLinear,
                                     int4_avx2_kernel, int4_kernel, int8_avx2_kernel, int8_group_avx2_kernel,
                                     int8_group_kernel, int8_kernel, int8_uses_amx, pack_nibbles, quantize_int4,
                                     quantize_int8, unpack_nibbles)
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.speculative import SpeculativeConfig, draft_quantization
from tests.test_engine import assert_batch_invariant, greedy, make_prompts


def cpu_flags() -> set[str]:
    return {word for line in open("/proc/cpuinfo") if line.startswith("flags") for word in line.split()}


def has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


def has_avx2_fma_f16c() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()


# Every quantized layer has a kernel on CPUs with AVX512-BF16 or with AVX2 + FMA + F16C.
needs_kernel = pytest.mark.skipif(not (can_build() and (has_avx512_bf16() or has_avx2_fma_f16c())),
                                  reason="needs AVX512-BF16 or AVX2 + FMA + F16C, and a compiler")


def skip_without_a_kernel(method: str) -> None:
    if (int8_kernel() if method == "int8" else int4_kernel()) is None:
        pytest.skip(f"no {method} kernel on this CPU (the PyTorch reference runs)")


def _linear(in_features: int, out_features: int, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    return torch.nn.Linear(in_features, out_features, bias=bias)


METHODS = ["int8", "int4", "int4-g64", "int4-g128"]


def _exact(x: torch.Tensor, method: str, linear: torch.nn.Linear) -> torch.Tensor:
    """x @ W^T + b in fp64 from the quantizer's own output: what both paths approximate only by
    rounding their output."""
    if method == "int8":
        q, scale = quantize_int8(linear.weight)
        w = q.double() * scale.double()[:, None]
    else:
        group = int(method.removeprefix("int4").removeprefix("-g") or 32)
        v, scale, minimum = quantize_int4(linear.weight, group)
        n, k = v.shape
        w = (v.double().view(n, -1, group) * scale.double()[..., None] + minimum.double()[..., None]).view(n, k)
    y = x.double() @ w.T
    return y if linear.bias is None else y + linear.bias.detach().double()


def test_quantize_int8_rounds_each_weight_to_its_channels_grid():
    w = torch.randn(40, 64) * torch.logspace(-3, 1, 40)[:, None]  # channels of very different size
    w[7] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert q.abs().max() <= 127 and torch.equal(q.abs().amax(dim=1)[torch.arange(40) != 7], torch.full((39,), 127, dtype=torch.int8))
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[7], torch.zeros(64, dtype=torch.int8))


def test_quantize_int4_spans_each_groups_range():
    w = torch.randn(8, 128) * torch.logspace(-2, 1, 8)[:, None]
    w[3, 32:64] = 0.5  # a constant group
    v, scale, minimum = quantize_int4(w, 32)
    assert v.dtype == torch.uint8 and v.max() <= 15 and scale.dtype == minimum.dtype == torch.float16
    assert scale.shape == minimum.shape == (8, 4)
    dequantized = v.float().view(8, 4, 32) * scale.float()[..., None] + minimum.float()[..., None]
    step = scale.float()[..., None]
    # within half a step, plus the fp16 rounding of the minimum and the scale
    assert torch.all((dequantized - w.view(8, 4, 32)).abs() <= step / 2 + 2e-3 * w.view(8, 4, 32).abs().amax(-1, keepdim=True))
    assert torch.equal(dequantized[3, 1], torch.full((32,), 0.5))


def test_nibbles_round_trip_through_the_kernel_layout():
    v = torch.randint(0, 16, (100, 96), dtype=torch.uint8)
    packed = pack_nibbles(v)
    assert packed.numel() == 128 * 96 // 2  # N padded to whole 64-column blocks
    assert torch.equal(unpack_nibbles(packed, 100, 96), v)
    rows = torch.tensor([99, 0, 15, 16, 63, 64, 70])  # across words, nibbles and blocks
    assert torch.equal(unpack_nibbles(packed, 100, 96, rows), v[rows])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("shape,bias", [((128, 96), True), ((128, 100), False), ((768, 2304), True)])
def test_quantized_linear_equals_exact_math(method, use_kernel, rows, shape, bias):
    """Both paths, at row counts across the kernels' row tiles (int8: 6, int4: 3; int8 on AMX:
    16) and int8's widening hand-overs (12; 16 on AMX), with N padded to whole 64-column blocks
    (100): within bf16 rounding of the exact result."""
    if use_kernel:
        skip_without_a_kernel(method)
    linear = _linear(*shape, bias=bias).to(torch.bfloat16)
    layer = make_quantized(linear, method, use_kernel=use_kernel)
    assert (layer.kernel is not None) == use_kernel
    x = torch.randn(rows, shape[0]).to(torch.bfloat16)
    expected = _exact(x, method, linear)
    tolerance = dict(atol=1e-2 * expected.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(layer(x).double(), expected, **tolerance)
    torch.testing.assert_close(layer.forward_gelu_tanh(x).double(), F.gelu(expected, approximate="tanh"), **tolerance)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_leading_dimensions_pass_through(method, use_kernel):
    """(B, T, K) in, (B, T, N) out, row for row the (M, K) result; a 1-D row too."""
    if use_kernel:
        skip_without_a_kernel(method)
    layer = make_quantized(_linear(64, 96).to(torch.bfloat16), method, use_kernel=use_kernel)
    x = torch.randn(6, 64).to(torch.bfloat16)
    flat = layer(x)
    assert torch.equal(layer(x.view(2, 3, 64)), flat.view(2, 3, 96))
    assert torch.equal(layer.forward_gelu_tanh(x.view(3, 2, 64)), layer.forward_gelu_tanh(x).view(3, 2, 96))
    assert torch.equal(layer(x[0]), flat[0])


@pytest.mark.parametrize("rows", [1, 13, 17, 33])
def test_int8_with_k_no_multiple_of_32_equals_exact_math(rows):
    """K = 80 leaves a part of an AMX tile: such layers take the dot products on every CPU."""
    skip_without_a_kernel("int8")
    linear = _linear(80, 64).to(torch.bfloat16)
    layer = make_quantized(linear, "int8")
    assert not int8_uses_amx(layer)
    x = torch.randn(rows, 80).to(torch.bfloat16)
    expected = _exact(x, "int8", linear)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-2 * expected.abs().max().item(), rtol=1e-2)


def test_int8_layers_take_amx_tiles_where_the_cpu_has_them(caplog):
    """On an AMX CPU every int8 layer with K a multiple of 32 multiplies with tiles, and the load
    log says so; elsewhere the log names the AVX512-BF16 or AVX2 kernel."""
    skip_without_a_kernel("int8")
    loaded = load_model("random:tiny-gpt2", dtype="bfloat16", device="cpu")
    with caplog.at_level("INFO"):
        engine = Engine(loaded, EngineConfig(num_kv_blocks=16, quantization="int8"))
    layers = [m for m in engine.runner.model.modules() if isinstance(m, Int8Linear)]
    tiles = load_kernel("nanoserve_amx_linear", "amx_linear.cpp")  # the bf16 AMX kernel asks the OS the same way
    amx = "amx_bf16" in cpu_flags() and tiles is not None and tiles.amx_available()
    assert {int8_uses_amx(m) for m in layers} == {amx}  # tiny GPT-2: every K (64, 256) a multiple of 32
    expected = "AMX" if amx else "AVX512-BF16" if has_avx512_bf16() else "AVX2"
    assert f"{len(layers)} on the {expected} kernel" in caplog.text


def test_the_load_log_says_float32_activations_run_the_reference_path(caplog):
    """The kernels take bf16 activations: a float32 model's quantized layers run the reference
    path whatever kernel this CPU has, and the log must not claim the kernel."""
    skip_without_a_kernel("int4")
    loaded = load_model("random:tiny-qwen2", dtype="float32", device="cpu")
    with caplog.at_level("INFO", logger="models.quantization"):
        Engine(loaded, EngineConfig(num_kv_blocks=16, quantization="int4"))
    assert "on the PyTorch reference path (float32 activations; the " in caplog.text
    assert "kernel takes bfloat16: --dtype bfloat16)" in caplog.text


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_kernel_rows_do_not_depend_on_their_batch(method):
    """Row r of a batch is bit-identical to row r alone, in every kernel path (int8: in registers
    up to 12 rows, through the widened scratch beyond; on AMX, 16-k-pair chunks up to 16 rows,
    the scratch beyond): what keeps greedy output batch-invariant."""
    skip_without_a_kernel(method)
    layer = make_quantized(_linear(768, 3072).to(torch.bfloat16), method)
    x = torch.randn(40, 768).to(torch.bfloat16)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(40)])
    assert torch.equal(layer(x), alone) and torch.equal(layer(x[:9]), alone[:9])


@pytest.mark.parametrize("method,bound", [("int8", 0.015), ("int4", 0.12), ("int4-g128", 0.14)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_is_close_to_the_float_layer(method, bound, dtype):
    """Against the unquantized fp32 layer, relative error of the output's norm (GPT-2's MLP
    shape, uniform weights as nn.Linear draws them, activations of unit size): int8 ~0.4%,
    4-bit ~6.5% (a 16-level grid over a uniform range); stated bounds 2-3x that."""
    linear = _linear(768, 3072)
    layer = make_quantized(linear.to(dtype), method)
    x = torch.randn(8, 768)
    expected = linear.float()(x).detach()
    error = (layer(x.to(dtype)).float() - expected).norm() / expected.norm()
    assert error < bound, error


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tied_embedding_reads_the_quantized_head(method):
    """GPT-2 ties wte to lm_head: after quantizing, the embedding reads the head's dequantized
    rows, and the table is stored once."""
    loaded = load_model("random:tiny-gpt2", dtype="bfloat16", device="cpu")
    model = loaded.model
    table = model.transformer.wte.weight.detach().clone()
    quantize_linear_layers(model, method)
    assert isinstance(model.lm_head.kernel, QuantizedLinear) and isinstance(model.transformer.wte.kernel, QuantizedEmbedding)
    assert all(m.kernel is not None and m.weight is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    ids = torch.tensor([[0, 5, table.shape[0] - 1], [3, 3, 64]])
    unembedded = torch.eye(table.shape[1])  # x @ W^T with x = I: the head's weight, by its own path
    expected = make_quantized(torch.nn.Linear(table.shape[1], table.shape[0], bias=False), method, use_kernel=False)
    expected.load_state_dict(model.lm_head.kernel.state_dict())
    rows = expected.reference(unembedded).T[ids].to(torch.bfloat16)  # (2, 3, C)
    assert torch.equal(model.transformer.wte(ids), rows)
    assert (model.transformer.wte(ids).float() - table[ids].float()).abs().max() < 0.2 * table.abs().max()


def test_unknown_method_is_refused():
    loaded = load_model("random:tiny-gpt2", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize_linear_layers(loaded.model, "int3")


# ---- the engine on a quantized model --------------------------------------------------------

def _quantized_engine(name: str, method: str, fast_kernels: bool = True, **config) -> Engine:
    loaded = load_model(name, dtype="bfloat16", device="cpu")
    return Engine(loaded, EngineConfig(quantization=method, fast_kernels=fast_kernels, **config))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_kernel_and_reference_path_give_the_same_greedy_tokens(method):
    """The same quantized model through the kernel and through the PyTorch reference."""
    skip_without_a_kernel(method)
    prompts = make_prompts(4, seed=3)
    outputs = [[c[0].token_ids for c in _quantized_engine("random:tiny-qwen2", method, fast, num_kv_blocks=64,
                                                           block_size=4).generate(prompts, greedy())]
               for fast in (False, True)]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("name,config", [
    ("random:tiny-gpt2", dict(num_kv_blocks=256, block_size=4, enable_prefix_caching=True)),
    ("random:tiny-gpt2", dict(num_kv_blocks=256, block_size=4, enable_prefix_caching=False)),
    ("random:tiny-qwen3", dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64)),  # preempts
    ("random:tiny-deepseek-v2", dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64)),  # MLA, preempts
])
def test_engine_invariants_hold_on_a_quantized_model(method, name, config):
    """Greedy output alone equals output in a batch, with and without prefix caching and under
    preemption; no KV block leaks."""
    engine = _quantized_engine(name, method, **config)
    kind = Int8Linear if method == "int8" else Int4Linear
    linears = [m for m in engine.runner.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m.kernel, kind) for m in linears), "every linear runs quantized"
    assert_batch_invariant(engine, expect_preemption=config.get("num_kv_blocks") == 24)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_draft_model_is_quantized_like_the_target(method):
    """--quantization reaches the speculative draft too; greedy speculation keeps the quantized
    target's own tokens (the draft only proposes), and no block leaks."""
    spec = SpeculativeConfig("draft", num_tokens=3, max_batch=1000, draft_model="random:tiny-qwen3", draft_num_layers=1)
    prompts = make_prompts(6, seed=2)
    plain = _quantized_engine("random:tiny-qwen3", method, num_kv_blocks=128, block_size=4)
    expected = [c[0].token_ids for c in plain.generate(prompts, greedy())]
    engine = _quantized_engine("random:tiny-qwen3", method, num_kv_blocks=128, block_size=4, speculative=spec)
    kind = Int8Linear if method == "int8" else Int4Linear
    draft_linears = [m for m in engine.proposer.runner.model.modules() if isinstance(m, torch.nn.Linear)]
    assert draft_linears and all(isinstance(m.kernel, kind) for m in draft_linears)
    assert [c[0].token_ids for c in engine.generate(prompts, greedy())] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert draft_quantization("gguf", "random:tiny-qwen3") is None  # no 4-bit tensors to keep
    assert draft_quantization("int4", "random:tiny-qwen3") == "int4"


@pytest.mark.parametrize("method,low,high", [("int8", 0.49, 0.53), ("int4", 0.30, 0.34), ("int4-g128", 0.26, 0.29)])
def test_quantized_model_weight_bytes(method, low, high):
    """int8: ~half of bf16; 4-bit: 5 bits a weight at group 32 (fp16 scale and minimum), 4.25
    at 128; GPT-2's position table and norms stay bf16."""
    loaded = load_model("random:gpt2", dtype="bfloat16", device="cpu", overrides={"layers": "2"})
    before = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    quantize_linear_layers(loaded.model, method)
    after = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert low < after / before < high, (before, after)


def test_kernels_are_available_where_the_cpu_has_avx512_bf16_or_avx2():
    """A routing slip must not quietly leave a CPU on the PyTorch reference path."""
    if can_build() and has_avx512_bf16():
        assert int8_kernel() is not None and int4_kernel() is not None and int8_group_kernel() is not None
        assert int4_kernel().__name__ == "int4_linear" and int8_group_kernel().__name__ == "int8_group_linear"
    if can_build() and has_avx2_fma_f16c():
        assert int8_kernel() is not None and int8_avx2_kernel() is not None
        assert int4_avx2_kernel() is not None and int8_group_avx2_kernel() is not None
        assert int4_kernel() is not None and int8_group_kernel() is not None
        if not has_avx512_bf16():
            assert int4_kernel().__name__ == "int4_avx2_linear"
            assert int8_group_kernel().__name__ == "int8_group_avx2_linear"


@pytest.mark.parametrize("shape,bias", [((768, 2304), True), ((3072, 768), False), ((128, 100), True), ((6, 33), True)])
def test_the_avx2_int8_kernel_equals_exact_math_at_every_row_count(shape, bias):
    """The AVX2 int8 kernel builds on every x86 CPU the tests run on (AVX-512 ones pick the
    AVX512-BF16 kernel, so it is called directly here): rows 1..64 against exact math on the same
    quantized weights; (128, 100) leaves a partial 32-column half-block, (6, 33) less than one."""
    kernel = int8_avx2_kernel()
    if kernel is None:
        assert not can_build(), "a compiler is here, so the AVX2 int8 kernel must build"
        pytest.skip("no compiler, or a CPU without AVX2 + FMA")
    linear = _linear(*shape, bias=bias).to(torch.bfloat16)
    layer = Int8Linear(linear, use_kernel=False)
    x = torch.randn(64, shape[0]).to(torch.bfloat16)
    batch = kernel(x, layer.qweight, layer.scale, layer.bias, shape[1], 0)
    for rows in range(1, 65):
        expected = _exact(x[:rows], "int8", linear)
        tolerance = dict(atol=1e-2 * expected.abs().max().item(), rtol=1e-2)
        y = kernel(x[:rows], layer.qweight, layer.scale, layer.bias, shape[1], 0)
        torch.testing.assert_close(y.double(), expected, **tolerance)
        assert torch.equal(y, batch[:rows]), "a row's result does not depend on its batch"
        gelu = kernel(x[:rows], layer.qweight, layer.scale, layer.bias, shape[1], 1)
        torch.testing.assert_close(gelu.double(), F.gelu(expected, approximate="tanh"), **tolerance)


def test_the_avx2_int8_kernel_adds_a_row_in_the_same_order_alone_and_batched():
    """One row (widened in registers) and a batch (widened into a scratch) must add the same
    products in the same order. A bf16 output hides most order changes, so here the order
    decides the result: with k-pair products (2^24, 1) then (1, -2^24), even-then-odd float32
    sums give 0 and odd-then-even give 1 (2^24 + 1 rounds to 2^24); exact math gives 2."""
    kernel = int8_avx2_kernel()
    if kernel is None:
        assert not can_build(), "a compiler is here, so the AVX2 int8 kernel must build"
        pytest.skip("no compiler, or a CPU without AVX2 + FMA")
    linear = torch.nn.Linear(6, 64, bias=False)
    with torch.no_grad():  # max |w| = 127 gives scale 1: q = w
        linear.weight.copy_(torch.tensor([64.0, 1.0, 1.0, -64.0, 127.0, 0.0]).expand(64, 6))
    layer = Int8Linear(linear.to(torch.bfloat16), use_kernel=False)
    assert torch.equal(layer.scale, torch.ones(64))
    x = torch.randn(5, 6).to(torch.bfloat16)
    x[0] = torch.tensor([2.0**18, 1.0, 1.0, 2.0**18, 0.0, 0.0])
    alone = kernel(x[:1], layer.qweight, layer.scale, None, 64, 0)
    batched = kernel(x, layer.qweight, layer.scale, None, 64, 0)
    assert torch.equal(alone, batched[:1])
    assert alone.unique().tolist() == [0.0]  # each k-pair's even product first, as the batched path


# ---- the AVX2 grouped kernels (4-bit, Q8_0), called directly on every x86 CPU ----------------

def _avx2_grouped(fmt: str):
    kernel = int4_avx2_kernel() if fmt.startswith("int4") else int8_group_avx2_kernel()
    if kernel is None:
        assert not (can_build() and has_avx2_fma_f16c()), "a compiler is here, so the AVX2 grouped kernels must build"
        pytest.skip("no compiler, or a CPU without AVX2 + FMA + F16C")
    return kernel


def _grouped_layer(fmt: str, linear: torch.nn.Linear) -> tuple[QuantizedLinear, torch.Tensor]:
    """A 4-bit (int4-gN) or Q8_0 layer on the reference path, and its exact (N, K) weight in fp64."""
    n, k = linear.out_features, linear.in_features
    if fmt == "q8_0":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = (torch.rand(n, k // 32) * 1e-2 + 1e-4).half()  # groups of very different size
        exact = (q.double().view(n, -1, 32) * scale.double()[..., None]).view(n, k)
        return Int8GroupLinear(linear, 32, (q, scale), use_kernel=False), exact
    group = int(fmt.removeprefix("int4-g"))
    v, scale, minimum = quantize_int4(linear.weight, group)
    exact = (v.double().view(n, -1, group) * scale.double()[..., None] + minimum.double()[..., None]).view(n, k)
    return Int4Linear(linear, group, use_kernel=False, parts=(v, scale, minimum)), exact


def _run_avx2_grouped(kernel, layer: QuantizedLinear, x: torch.Tensor, activation: int = 0) -> torch.Tensor:
    if isinstance(layer, Int4Linear):
        return kernel(x, layer.nibbles, layer.scale, layer.minimum, layer.bias, layer.out_features, layer.group_size,
                      activation)
    return kernel(x, layer.qweight, layer.scale, layer.bias, layer.out_features, layer.group_size, activation)


@pytest.mark.parametrize("fmt,shape,bias", [
    ("int4-g32", (768, 2304), True), ("int4-g32", (128, 100), False), ("int4-g32", (64, 33), True),
    ("int4-g64", (192, 128), True), ("int4-g128", (256, 96), False),
    ("q8_0", (576, 1536), True), ("q8_0", (96, 100), False), ("q8_0", (64, 33), True)])
def test_the_avx2_grouped_kernels_equal_exact_math_at_every_row_count(fmt, shape, bias):
    """Rows 1..64 (one row in registers; more through the widened group in L1, in chunks of 48)
    against exact math on the same quantized weights, N padded to whole 64-column blocks (100:
    a partial 32-column half; 33: less than one); every row bit-identical to the same row in
    the 64-row batch."""
    kernel = _avx2_grouped(fmt)
    torch.manual_seed(sum(shape))
    layer, w = _grouped_layer(fmt, _linear(*shape, bias=bias).to(torch.bfloat16))
    x = torch.randn(64, shape[0]).to(torch.bfloat16)
    exact = x.double() @ w.T + (layer.bias.double() if bias else 0)
    batch = _run_avx2_grouped(kernel, layer, x)
    for rows in range(1, 65):
        expected = exact[:rows]
        tolerance = dict(atol=1e-2 * expected.abs().max().item(), rtol=1e-2)
        y = _run_avx2_grouped(kernel, layer, x[:rows])
        torch.testing.assert_close(y.double(), expected, **tolerance)
        assert torch.equal(y, batch[:rows]), f"row results depend on the batch at {rows} rows"
        gelu = _run_avx2_grouped(kernel, layer, x[:rows], activation=1)
        torch.testing.assert_close(gelu.double(), F.gelu(expected, approximate="tanh"), **tolerance)


@pytest.mark.parametrize("fmt", ["int4-g32", "q8_0"])
def test_the_avx2_grouped_kernels_add_a_row_in_the_same_order_alone_and_batched(fmt):
    """As the int8 test above: k-pair products (2^24, 1) then (1, -2^24) with unit scale (and
    zero minimum) sum to 0 even-then-odd and to 1 odd-then-even in float32, so a path that
    reorders its chain differs from the other, not only in exact math (which gives 2)."""
    kernel = _avx2_grouped(fmt)
    k, n = 32, 64
    values = torch.zeros(n, k)
    values[:, :4] = torch.tensor([8.0, 1.0, 1.0, 8.0])  # times x = (2^21, 1, 1, -2^21)
    linear = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    if fmt == "q8_0":
        layer = Int8GroupLinear(linear, 32, (values.to(torch.int8), torch.ones(n, 1, dtype=torch.float16)),
                                use_kernel=False)
    else:
        ones, zeros = torch.ones(n, 1, dtype=torch.float16), torch.zeros(n, 1, dtype=torch.float16)
        layer = Int4Linear(linear, 32, use_kernel=False, parts=(values.to(torch.uint8), ones, zeros))
    x = torch.randn(5, k).to(torch.bfloat16)
    x[0, :4] = torch.tensor([2.0**21, 1.0, 1.0, -(2.0**21)])
    x[0, 4:] = 0
    alone, batched = _run_avx2_grouped(kernel, layer, x[:1]), _run_avx2_grouped(kernel, layer, x)
    assert torch.equal(alone, batched[:1])
    assert alone.unique().tolist() == [0.0]  # each k-pair's even product first, in both paths


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "q8_0"])
def test_the_avx2_quantized_kernels_widen_strided_and_large_inputs_alike(fmt):
    """The AVX2 kernels widen a decode-sized x into a per-thread buffer (a 64K-float one) and
    a larger one through ATen: a row gives the same bits either way, and rows of a wider tensor
    (row stride past K) the same as a contiguous copy."""
    in_features, out_features = 1536, 96
    torch.manual_seed(7)
    linear = _linear(in_features, out_features).to(torch.bfloat16)
    if fmt == "int8":
        kernel = int8_avx2_kernel()
        if kernel is None:
            assert not can_build(), "a compiler is here, so the AVX2 int8 kernel must build"
            pytest.skip("no compiler, or a CPU without AVX2 + FMA")
        layer = Int8Linear(linear, use_kernel=False)
        run = lambda x: kernel(x, layer.qweight, layer.scale, layer.bias, out_features, 0)  # noqa: E731
    else:
        kernel = _avx2_grouped(fmt)
        layer = _grouped_layer(fmt, linear)[0]
        run = lambda x: _run_avx2_grouped(kernel, layer, x)  # noqa: E731
    wide = torch.randn(48, in_features + 40).to(torch.bfloat16)
    x = wide[:, :in_features]  # 48 x 1536 floats: past the buffer, so ATen widens the batch
    batch = run(x)
    assert torch.equal(batch, run(x.contiguous()))
    for row in (0, 17, 47):
        assert torch.equal(run(x[row:row + 1]), batch[row:row + 1]), f"row {row}"
    assert torch.equal(run(x[:3]), batch[:3])


# ---- a model shared by engines, refusals ----------------------------------------------------

def test_a_second_engine_must_ask_for_the_same_method():
    """Quantizing replaces the model's layers; an engine built on the same model later gets them
    only if it asks for the same method (else /server_info would tell a lie)."""
    loaded = load_model("random:tiny-qwen2", dtype="bfloat16", device="cpu")
    Engine(loaded, EngineConfig(num_kv_blocks=16, quantization="int4"))
    Engine(loaded, EngineConfig(num_kv_blocks=16, quantization="int4"))
    for other in (None, "int8"):
        with pytest.raises(ValueError, match="already int4; it cannot be served with --quantization"):
            Engine(loaded, EngineConfig(num_kv_blocks=16, quantization=other))


def test_layers_a_method_cannot_store_are_refused_before_any_is_replaced():
    loaded = load_model("random:tiny-qwen2", dtype="bfloat16", device="cpu")  # hidden 64, MLP 128
    with pytest.raises(ValueError, match=r"int4-g128: .*64 input features do not split into groups of 128"):
        quantize_linear_layers(loaded.model, "int4-g128")
    assert not any(isinstance(m, QuantizedLinear) for m in loaded.model.modules())
    with pytest.raises(ValueError, match="pairs input features; the layer has an odd number"):
        make_quantized(torch.nn.Linear(33, 8), "int8")


def test_int8_reference_does_not_overflow_float16():
    """The unscaled int8 sums are ~127 / max|w| times the output: fp16 scales the weight first."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 768, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02)
    layer = make_quantized(linear.half(), "int8", use_kernel=False)
    x = torch.randn(2, 3072)
    x[:, 5] = 700.0  # an outlier activation, as Llama-style down projections see
    y = layer(x.half())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), linear.float()(x).detach(), atol=1.0, rtol=0.05)
