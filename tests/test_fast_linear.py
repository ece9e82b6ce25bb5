"""The packed-weight linear is a drop-in for nn.Linear."""
import pytest
import torch

from models.fast_linear import PackedLinear, can_pack, pack_linear_layers
from models.loader import load_model


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_linear_equals_linear():
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=1e-2, rtol=1e-2)


def test_only_bf16_cpu_models_are_packed():
    fp32 = load_model("random:tiny-gpt2", dtype="float32", device="cpu").model
    assert not can_pack(fp32) and pack_linear_layers(fp32) == 0
    bf16 = load_model("random:tiny-gpt2", dtype="bfloat16", device="cpu").model
    if can_pack(bf16):
        assert pack_linear_layers(bf16) == 2 * 4  # c_attn, c_proj, c_fc, c_proj per layer; not lm_head
        assert isinstance(bf16.lm_head, torch.nn.Linear)
