"""The C++ elementwise op (models/csrc/elementwise.cpp) against the PyTorch composition it
replaces (models/layers.py): the rotary embedding, on the strided views the models hand it, and
bound through the kernel seam only where it applies."""
import pytest
import torch

from models.cpu_kernels import can_build
from models.kernels import bind_kernels, select_kernels
from models.layers import GatedMLP, RotaryEmbedding, apply_rotary, elementwise_kernel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def kernel():
    k = elementwise_kernel()
    if k is None:
        assert not can_build(), "the elementwise kernel should build here: see tests/test_cpu_kernels.py"
        pytest.skip("no compiler or ninja here: only the PyTorch path runs")
    return k


def tables(num_tokens: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rope = RotaryEmbedding(head_dim, 4096, 10000.0)
    positions = torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    step = rope.tables(positions)
    return step.cos, step.signed_sin


def rotary_by_definition(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The kernel's stated rounding, in float64: x * cos rounded to float32, then the rolled
    product added with one rounding (a fused multiply-add), then x's dtype. (The float64 sum
    rounds once more than a true fused multiply-add; a tie that this changes is ~2^-29 rare.)"""
    xd = x.double()
    straight = (xd * cos.double()).float().double()
    return (straight + xd.roll(x.shape[-1] // 2, dims=-1) * signed_sin.double()).float().to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_rotary_matches_the_composition_on_a_strided_qk_view(kernel, dtype, num_tokens):
    """Qwen rotates q and k together as a view of the fused qkv output: rows are (H + 2 KVH) D apart."""
    H, KVH, D = 9, 3, 64
    gen = torch.Generator().manual_seed(num_tokens)
    qkv = (3 * torch.randn(num_tokens, (H + 2 * KVH) * D, generator=gen)).to(dtype)
    qk = qkv[:, :(H + KVH) * D].view(-1, H + KVH, D)
    cos, signed_sin = tables(num_tokens, D, num_tokens)
    out = kernel.rotary(qk, cos, signed_sin)
    assert out.shape == qk.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, rotary_by_definition(qk, cos, signed_sin))
    composition = apply_rotary(qk, cos, signed_sin)
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":  # ATen's vector kernel fuses the multiply-add
        assert torch.equal(out, composition)
    else:  # its scalar one may round the rolled product on its own
        torch.testing.assert_close(out, composition, atol=1e-6, rtol=2**-6 if dtype != torch.float32 else 1e-6)


def test_rotary_takes_mla_slices(kernel):
    """MLA rotates the last R values of each head, and of the latent row (one "head")."""
    N, H, Dn, R, L = 5, 4, 16, 8, 32
    q = torch.randn(N, H, Dn + R).to(torch.bfloat16)
    ckv = torch.randn(N, L + R).to(torch.bfloat16)
    cos, signed_sin = tables(N, R, 3)
    for x in (q[..., Dn:], ckv[:, None, L:]):
        assert torch.equal(kernel.rotary(x, cos, signed_sin), rotary_by_definition(x, cos, signed_sin))


def test_the_seam_binds_them_on_cpu_and_unbinds_them(kernel):
    """A bound model rotates through the C++ op; fast kernels off, through the composition; an
    input the kernel does not take (a column-strided view) falls back. The MLP's SiLU-and-multiply
    is ATen's on every backend: a bound model computes what the unbound one does."""
    mlp, rope = GatedMLP(64, 96), RotaryEmbedding(32, 128, 10000.0)
    mlp.add_module("rope", rope)
    x = torch.randn(3, 64)
    unbound = mlp(x)
    bind_kernels(mlp, select_kernels(torch.device("cpu"), True, torch.float32, 32))
    assert rope.rotate.args == (kernel.rotary,)
    torch.testing.assert_close(mlp(x), unbound, atol=1e-5, rtol=1e-5)
    step = rope.tables(torch.tensor([5, 9]))
    qk = torch.randn(2, 4, 32)
    assert torch.equal(step(qk), kernel.rotary(qk, step.cos, step.signed_sin))
    columns = torch.randn(2, 4, 64)[..., ::2]  # unit stride broken: the composition
    assert torch.equal(step(columns), apply_rotary(columns, step.cos, step.signed_sin))
    bind_kernels(mlp, select_kernels(torch.device("cpu"), False, torch.float32, 32))
    assert rope.rotate is apply_rotary
    assert torch.equal(mlp(x), unbound)
