"""The C++ elementwise ops (models/csrc/elementwise.cpp) against the PyTorch compositions they
replace (models/layers.py): the rotary embedding and SwiGLU's SiLU-and-multiply, on the strided
views the models hand them, and bound through the kernel seam only where they apply."""
import pytest
import torch

from models.cpu_kernels import can_build
from models.kernels import bind_kernels, select_kernels
from models.layers import GatedMLP, RotaryEmbedding, apply_rotary, elementwise_kernel, silu_and_mul_reference

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 33])
def test_silu_and_mul_matches_the_composition(kernel, dtype, num_tokens):
    F = 1536
    gen = torch.Generator().manual_seed(num_tokens)
    wide = (4 * torch.randn(num_tokens, 2 * F + 64, generator=gen)).to(dtype)
    gate_up = wide[:, :2 * F]  # rows 2F + 64 apart: the kernel reads any row stride
    out = kernel.silu_and_mul(gate_up)
    assert out.shape == (num_tokens, F) and out.dtype == dtype
    gate, up = gate_up.double().chunk(2, dim=-1)
    silu = (gate * torch.sigmoid(gate)).to(dtype).double()  # rounded to x's dtype before the product
    # the kernel's vectorized exp and approximate reciprocal (-ffast-math) differ from ATen's in
    # the last float32 bits; where that moves silu's rounding by one step, the product moves by
    # up to two of x's dtype
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0, rtol=2**-6 if dtype == torch.bfloat16 else 2**-9)
    torch.testing.assert_close(out, (silu * up).to(dtype), **tolerance)
    torch.testing.assert_close(out, silu_and_mul_reference(gate_up), **tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_of_gates_past_exps_range(kernel, dtype):
    """A gate below -88.7 overflows exp(-g): silu is then -0 (not NaN), as PyTorch's; a large
    positive one is the gate itself. F = 13 leaves a tail past any vector width."""
    gates = torch.tensor([-90.0, -1e4, -60000.0, -88.0, 0.0, 30.0, 89.0, 1e4, -1.0, 1.0, -200.0, 5.0, -89.0])
    gate_up = torch.cat((gates, torch.linspace(-3, 3, 13))).to(dtype)[None, :].repeat(3, 1)
    out = kernel.silu_and_mul(gate_up)
    assert not out.isnan().any()
    torch.testing.assert_close(out, silu_and_mul_reference(gate_up), atol=1e-30, rtol=2**-6)


def test_the_seam_binds_them_on_cpu_and_unbinds_them(kernel):
    """A bound model rotates and gates through the C++ ops; fast kernels off, through the
    composition; inputs the kernels do not take (1-D, or a column-strided view) fall back."""
    mlp, rope = GatedMLP(64, 96), RotaryEmbedding(32, 128, 10000.0)
    mlp.add_module("rope", rope)
    x = torch.randn(3, 64)
    unbound = mlp(x)
    bind_kernels(mlp, select_kernels(torch.device("cpu"), True, torch.float32, 32))
    assert rope.rotate.args == (kernel.rotary,) and mlp.silu_and_mul.args == (kernel.silu_and_mul,)
    torch.testing.assert_close(mlp(x), unbound, atol=1e-5, rtol=1e-5)
    step = rope.tables(torch.tensor([5, 9]))
    qk = torch.randn(2, 4, 32)
    assert torch.equal(step(qk), kernel.rotary(qk, step.cos, step.signed_sin))
    columns = torch.randn(2, 4, 64)[..., ::2]  # unit stride broken: the composition
    assert torch.equal(step(columns), apply_rotary(columns, step.cos, step.signed_sin))
    vector = torch.randn(2 * 96)
    assert torch.equal(mlp.silu_and_mul(vector), silu_and_mul_reference(vector))
    bind_kernels(mlp, select_kernels(torch.device("cpu"), False, torch.float32, 32))
    assert rope.rotate is apply_rotary and mlp.silu_and_mul is silu_and_mul_reference
    assert torch.equal(mlp(x), unbound)
