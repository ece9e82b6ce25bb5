"""The packed-weight linear (oneDNN, and the small-batch kernel for this CPU: AMX, or AVX512-BF16
without AMX; the AVX2 kernel with its own layout where oneDNN has no bf16) is a drop-in for nn.Linear."""
import functools

import pytest
import torch
import torch.nn.functional as F

from models.cpu_kernels import can_build, load_kernel
from models.fast_linear import (AMX_LAYOUT, PAIRS32_LAYOUT, PAIRS64_LAYOUT, PackedEmbedding, PackedLinear, can_pack,
                                onednn_packs_bf16, own_layout_kernel, pack_linear_layers, small_batch_kernels)
from models.loader import load_model

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def token_embedding(model: torch.nn.Module) -> torch.nn.Module:
    return model.transformer.wte if hasattr(model, "transformer") else model.model.embed_tokens


def _bf16_linear(in_features: int, out_features: int, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    return torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)


@functools.cache
def a_kernel_reads_this_cpus_layout() -> bool:
    """Whether oneDNN packs a GPT-2-sized weight here in a layout some small-batch kernel reads
    (true on AMX CPUs and on the AVX512-BF16 EPYCs these tests run on; a CPU whose oneDNN picks
    another layout runs oneDNN alone, as the load log says)."""
    return PackedLinear(_bf16_linear(768, 2304)).kernel is not None


def _close_to_fp32(actual: torch.Tensor, expected_fp32: torch.Tensor) -> None:
    """Within bf16 rounding of the output (both kernels accumulate in fp32)."""
    torch.testing.assert_close(actual.float(), expected_fp32, atol=2e-2, rtol=1.6e-2)


@needs_onednn
@pytest.mark.parametrize("use_small_batch", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("shape,bias", [((64, 96), True), ((128, 64), False), ((96, 100), True), ((48, 64), True)])
def test_packed_linear_equals_linear(use_small_batch, rows, shape, bias):
    """Row counts cross the AMX tile edges (16, 32), the AVX512-BF16 register tile (6) and the
    oneDNN hand-over (> 32); (96, 100) has N padded to a whole block, (48, 64) a K that only
    oneDNN takes."""
    linear = _bf16_linear(*shape, bias=bias)
    packed = PackedLinear(linear, use_small_batch=use_small_batch)
    if own_layout_kernel() is not None:  # no oneDNN bf16 here: the AVX2 kernel takes every layer and row count
        assert packed.kernel is own_layout_kernel()
    elif use_small_batch and a_kernel_reads_this_cpus_layout():
        assert (packed.kernel is not None) == (shape[0] % 32 == 0)
    x = torch.randn(rows, shape[0]).to(torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    _close_to_fp32(packed(x), expected)
    _close_to_fp32(packed.forward_gelu_tanh(x), F.gelu(expected, approximate="tanh"))


@needs_onednn
@pytest.mark.parametrize("kernel", small_batch_kernels(), ids=lambda k: k.name)
def test_small_batch_kernel_matches_onednn_at_decode_shapes(kernel):
    """Each small-batch kernel this CPU runs, against oneDNN, at GPT-2 and Qwen decode shapes and
    every row count 1..64 (the kernel itself takes any count). A kernel reads oneDNN's packed
    buffer where oneDNN lays it out for that kernel; elsewhere (the AVX512-BF16 kernel on an AMX
    CPU) the weight is laid out here in the kernel's layout."""
    for in_features, out_features in [(768, 2304), (3072, 768), (896, 4864)]:
        linear = _bf16_linear(in_features, out_features)
        packed = PackedLinear(linear)
        own = None if packed.kernel == kernel else kernel.layout.order(linear.weight.detach()).contiguous()
        weight_buffer = packed.weight_buffer if own is None else (own.data_ptr(), own.numel() * 2)
        bias_f32 = linear.bias.detach().float()
        for rows in range(1, 65):
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            onednn = torch.ops.mkldnn._linear_pointwise(x, packed.packed_weight, packed.bias, "none", [], "")
            ours = kernel.linear(x, *weight_buffer, bias_f32, out_features, 0)
            torch.testing.assert_close(ours, onednn, atol=6e-2, rtol=1.6e-2)


def _avx2_kernel():
    module = load_kernel("nanoserve_bf16_avx2_linear", "bf16_avx2_linear.cpp")
    if module is None or not module.bf16_avx2_available():
        assert not can_build(), "a compiler is here, so the AVX2 kernel must build"
        pytest.skip("no compiler, or a CPU without AVX2 + FMA")
    return module


@pytest.mark.parametrize("in_features,out_features,bias", [(768, 2304, True), (3072, 768, True), (896, 4864, False),
                                                           (64, 100, True), (6, 33, False)])
def test_the_avx2_kernel_matches_the_fp32_reference_at_every_row_count(in_features, out_features, bias):
    """The AVX2 kernel runs on every x86 CPU these tests run on, whatever oneDNN does there, so it
    is checked everywhere: rows 1..64 cross its 3-row register tile; (64, 100) pads N to a whole
    32-column block and leaves a 4-column tail; (6, 33) is smaller than one block."""
    module = _avx2_kernel()
    linear = _bf16_linear(in_features, out_features, bias)
    packed = PAIRS32_LAYOUT.order(linear.weight.detach()).contiguous()
    bias_f32 = None if linear.bias is None else linear.bias.detach().float()
    w32, b32 = linear.weight.float(), bias_f32
    for rows in range(1, 65):
        x = torch.randn(rows, in_features).to(torch.bfloat16)
        expected = F.linear(x.float(), w32, b32)
        for activation, reference in ((0, expected), (1, F.gelu(expected, approximate="tanh"))):
            y = module.bf16_avx2_linear(x, packed.data_ptr(), packed.numel() * 2, bias_f32, out_features, activation)
            assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
            _close_to_fp32(y, reference)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out_features", [32, 64, 96, 160, 224, 2304])
def test_the_avx2_kernel_gives_a_row_the_same_bits_alone_and_batched(threads, out_features):
    """Batch 1 streams three blocks side by side, more rows run register tiles over one block:
    both must make each column's products in the same order. Block counts 1, 2, 3, 5, 7 and 72
    leave each thread 0, 1 or 2 blocks past its last whole triple, with one thread and with two."""
    module = _avx2_kernel()
    linear = _bf16_linear(768, out_features)
    packed = PAIRS32_LAYOUT.order(linear.weight.detach()).contiguous()
    bias_f32 = linear.bias.detach().float()
    x = torch.randn(64, 768).to(torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batched = module.bf16_avx2_linear(x, packed.data_ptr(), packed.numel() * 2, bias_f32, out_features, 0)
        for row in range(0, 64, 7):
            alone = module.bf16_avx2_linear(x[row:row + 1], packed.data_ptr(), packed.numel() * 2, bias_f32, out_features, 0)
            assert torch.equal(alone[0], batched[row]), f"row {row}"
    finally:
        torch.set_num_threads(previous)
    _close_to_fp32(batched, F.linear(x.float(), linear.weight.float(), bias_f32))


def test_the_avx2_kernel_widens_strided_and_large_inputs_alike():
    """Decode-sized inputs widen into a per-thread buffer (64K floats), larger ones through
    ATen: a row gives the same bits either way, and rows of a wider tensor (row stride past K,
    as a slice of a fused projection's output) the same as a contiguous copy. K = 1004 leaves
    a tail of 4 past the 8-wide widening."""
    module = _avx2_kernel()
    linear = _bf16_linear(1004, 96)
    packed = PAIRS32_LAYOUT.order(linear.weight.detach()).contiguous()
    run = lambda x: module.bf16_avx2_linear(x, packed.data_ptr(), packed.numel() * 2, None, 96, 0)  # noqa: E731
    x = torch.randn(80, 1040).to(torch.bfloat16)[:, :1004]  # 80 320 floats: ATen widens the batch
    batch = run(x)
    assert torch.equal(batch, run(x.contiguous()))
    for row in (0, 41, 79):
        assert torch.equal(run(x[row:row + 1]), batch[row:row + 1]), f"row {row}"
    assert torch.equal(run(x[5:9]), batch[5:9])
    _close_to_fp32(batch, F.linear(x.float(), linear.weight.float()))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_the_avx2_kernel_adds_each_columns_products_in_k_order(rows, threads):
    """Products 2^24, 0 at (k0, k1) then 1, -2^24 at (k2, k3): in k order float32 loses the 1
    (2^24 + 1 rounds to 2^24) and ends at 0; any other order of a k-pair's two products ends at 1.
    Batch 1 (three blocks side by side on one thread, 2 + 1 on two) and the row tiles must both
    give 0."""
    module = _avx2_kernel()
    in_features, out_features = 4, 96
    weight = torch.tensor([2.0 ** 12, 1.0, 1.0, -2.0 ** 12]).repeat(out_features, 1).to(torch.bfloat16)
    x = torch.tensor([2.0 ** 12, 0.0, 1.0, 2.0 ** 12]).repeat(rows, 1).to(torch.bfloat16)
    packed = PAIRS32_LAYOUT.order(weight).contiguous()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = module.bf16_avx2_linear(x, packed.data_ptr(), packed.numel() * 2, None, out_features, 0)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(y, torch.zeros(rows, out_features, dtype=torch.bfloat16))


def test_the_avx2_kernel_rounds_to_nearest_even_bit_for_bit():
    """One-hot rows make each output W[n][k] + b[n], one float32 add (as in the kernel's
    epilogue), then one rounding to bf16; biases with the low half exactly 0x8000 over zero weights
    sit halfway between two bf16s, where truncating or rounding half up would differ."""
    module = _avx2_kernel()
    in_features, out_features = 64, 72
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features).to(torch.bfloat16)
    weight[::3] = 0  # every third column of y is its bias alone
    bias_bits = torch.randn(out_features).view(torch.int32) & ~0xFFFF | 0x8000  # halfway: ...1000 0000 0000 0000
    bias_bits[1::2] |= 0x10000  # an odd bf16 below on odd columns: ties round up there
    bias = bias_bits.view(torch.float32)
    packed = PAIRS32_LAYOUT.order(weight).contiguous()
    x = torch.eye(in_features, dtype=torch.bfloat16)  # row k picks W[:, k]
    y = module.bf16_avx2_linear(x, packed.data_ptr(), packed.numel() * 2, bias, out_features, 0)
    expected = (weight.float().T + bias).to(torch.bfloat16)  # (K, N): torch rounds to nearest even
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


def test_the_avx2_kernel_refuses_a_buffer_too_small_for_its_shape():
    module = _avx2_kernel()
    packed = PAIRS32_LAYOUT.order(torch.ones(64, 32, dtype=torch.bfloat16)).contiguous()
    with pytest.raises(RuntimeError, match="packed weight too small"):
        module.bf16_avx2_linear(torch.ones(1, 32, dtype=torch.bfloat16), packed.data_ptr(), packed.numel() * 2,
                                None, 96, 0)


def test_a_cpu_without_onednn_bf16_packs_every_linear_for_the_avx2_kernel(caplog):
    """Where oneDNN has no bf16 path (AVX2-only CPUs) a bf16 model still loads and serves: every
    linear and the tied head go to the AVX2 kernel, and the log says so."""
    if onednn_packs_bf16():
        pytest.skip("oneDNN packs bf16 on this CPU; the AVX2 kernel is not needed")
    _avx2_kernel()
    model = load_model("random:tiny-gpt2", dtype="bfloat16", device="cpu").model
    with caplog.at_level("INFO", logger="models.fast_linear"):
        assert can_pack(model) and pack_linear_layers(model) == 2 * 4 + 1
    assert "for the AVX2 bf16 kernel, every batch size" in caplog.text
    kernels = {m.kernel.kernel.name for m in model.modules() if isinstance(getattr(m, "kernel", None), PackedLinear)}
    assert kernels == {"AVX2"}
    assert isinstance(model.transformer.wte.kernel, PackedEmbedding)


def test_every_cpu_with_avx512_bf16_gets_a_small_batch_kernel():
    """AMX CPUs get the AMX kernel, other AVX512-BF16 CPUs the dot-product one (where a
    compiler is present); plain AVX2 CPUs get the AVX2 kernel (test above)."""
    from models.loader import cpu_has_fast_bf16

    if not (can_build() and cpu_has_fast_bf16()):
        pytest.skip("no AVX512-BF16 here, or no compiler: oneDNN alone")
    names = [k.name for k in small_batch_kernels()]
    assert names and names[-1] == "AVX512-BF16"


@pytest.mark.parametrize("layout", [AMX_LAYOUT, PAIRS64_LAYOUT, PAIRS32_LAYOUT], ids=["amx", "pairs64", "pairs32"])
def test_layout_order_and_rows_are_inverse(layout):
    weight = torch.arange(100 * 64, dtype=torch.float32).reshape(100, 64)
    values = layout.order(weight)
    assert values.numel() == -(-100 // layout.cols) * layout.cols * 64  # N padded to whole blocks
    ids = torch.tensor([0, 1, 31, 32, 63, 64, 99])
    assert torch.equal(layout.rows(values, ids, 64), weight[ids])


def test_only_bf16_cpu_models_are_packed():
    fp32 = load_model("random:tiny-gpt2", dtype="float32", device="cpu").model
    assert not can_pack(fp32) and pack_linear_layers(fp32) == 0
    bf16 = load_model("random:tiny-gpt2", dtype="bfloat16", device="cpu").model
    if can_pack(bf16):
        with_head = PackedLinear(bf16.lm_head).kernel is not None  # packed only for a small-batch kernel
        head, wte = bf16.lm_head, bf16.transformer.wte
        assert pack_linear_layers(bf16) == 2 * 4 + with_head  # c_attn, c_proj, c_fc, c_proj per layer
        assert bf16.lm_head is head and bf16.transformer.wte is wte, "layers stay; only their kernel is set"
        assert isinstance(head.kernel, PackedLinear) if with_head else head.kernel is None
        assert isinstance(wte.kernel, PackedEmbedding) if with_head else wte.kernel is None
        assert isinstance(bf16.transformer.h[0].attn.c_attn.kernel, PackedLinear)
        assert bf16.transformer.h[0].attn.c_attn.weight is None, "the dense weight is released once packed"


@needs_onednn
@pytest.mark.parametrize("model_name", ["random:tiny-gpt2", "random:tiny-qwen2"])
def test_packed_model_keeps_its_outputs_and_stores_the_tied_table_once(model_name):
    """Embedding rows come out of the packed head exactly; logits stay within bf16 rounding."""
    loaded = load_model(model_name, dtype="bfloat16", device="cpu")
    if PackedLinear(loaded.model.lm_head).kernel is None:
        pytest.skip("the LM head is packed only for a small-batch kernel, and none runs here")
    model = loaded.model
    embedding = token_embedding(model)
    assert embedding.weight is model.lm_head.weight, "these presets tie the head to the embedding"
    table_param = embedding.weight
    table = table_param.detach().clone()
    ids = torch.tensor([0, 1, 31, 32, table.shape[0] - 1, 5, 5])
    positions = torch.arange(len(ids))
    from models.attention import build_attention_metadata

    meta = build_attention_metadata([len(ids)], [len(ids)], None, 16)
    with torch.inference_mode():
        before = model.compute_logits(model(ids, positions, meta)).float()
        pack_linear_layers(model)
        assert token_embedding(model) is embedding and isinstance(embedding.kernel, PackedEmbedding)
        assert torch.equal(token_embedding(model)(ids), table[ids])
        after = model.compute_logits(model(ids, positions, meta)).float()
    params = {id(p) for p in model.parameters()}
    assert id(table_param) not in params, "the plain table is dropped once the head serves it"
    torch.testing.assert_close(after, before, atol=0.1, rtol=0.05)
    assert torch.equal(after.argmax(-1), before.argmax(-1))
