"""The packed-weight linear (oneDNN, and the AMX small-batch kernel where this CPU has it) is a
drop-in for nn.Linear."""
import pytest
import torch
import torch.nn.functional as F

from models.fast_linear import AMX_MAX_ROWS, PackedLinear, amx_kernel, can_pack, linear_gelu_tanh, pack_linear_layers
from models.loader import load_model

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def _bf16_linear(in_features: int, out_features: int, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(in_features * 1000 + out_features)
    return torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)


def _close_to_fp32(actual: torch.Tensor, expected_fp32: torch.Tensor) -> None:
    """Within bf16 rounding of the output (both kernels accumulate in fp32)."""
    torch.testing.assert_close(actual.float(), expected_fp32, atol=2e-2, rtol=1.6e-2)


@needs_onednn
@pytest.mark.parametrize("use_amx", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("shape,bias", [((64, 96), True), ((128, 64), False), ((96, 100), True)])
def test_packed_linear_equals_linear(use_amx, rows, shape, bias):
    """Every row count crosses the AMX tile edges (16, 32) and the oneDNN hand-over (> 32);
    (96, 100) has N not a multiple of 32, which must stay on oneDNN."""
    linear = _bf16_linear(*shape, bias=bias)
    packed = PackedLinear(linear, use_amx=use_amx)
    if use_amx and amx_kernel() is not None:
        assert (packed.amx is not None) == (shape[1] % 32 == 0)
    x = torch.randn(rows, shape[0]).to(torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    _close_to_fp32(packed(x), expected)
    _close_to_fp32(linear_gelu_tanh(packed, x), F.gelu(expected, approximate="tanh"))


@needs_onednn
def test_amx_kernel_matches_onednn_at_decode_shapes():
    """The AMX path against oneDNN on one packed buffer, at GPT-2 decode shapes."""
    if amx_kernel() is None:
        pytest.skip("this CPU or build has no AMX")
    for in_features, out_features in [(768, 2304), (3072, 768)]:
        packed = PackedLinear(_bf16_linear(in_features, out_features))
        assert packed.amx is not None
        x = torch.randn(AMX_MAX_ROWS, in_features).to(torch.bfloat16)
        onednn = torch.ops.mkldnn._linear_pointwise(x, packed.packed_weight, packed.bias, "none", [], "")
        torch.testing.assert_close(packed(x), onednn, atol=6e-2, rtol=1.6e-2)


def test_only_bf16_cpu_models_are_packed():
    fp32 = load_model("random:tiny-gpt2", dtype="float32", device="cpu").model
    assert not can_pack(fp32) and pack_linear_layers(fp32) == 0
    bf16 = load_model("random:tiny-gpt2", dtype="bfloat16", device="cpu").model
    if can_pack(bf16):
        assert pack_linear_layers(bf16) == 2 * 4  # c_attn, c_proj, c_fc, c_proj per layer; not lm_head
        assert isinstance(bf16.lm_head, torch.nn.Linear)
