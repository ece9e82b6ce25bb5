"""The C++ RMSNorm (models/csrc/rms_norm.cpp) against the PyTorch composition it replaces."""
import pytest
import torch

from models.cpu_kernels import can_build
from models.kernels import bind_kernels, select_kernels
from models.layers import RMSNorm, rms_norm_kernel, rms_norm_reference


@pytest.fixture(scope="module")
def kernel():
    k = rms_norm_kernel()
    if k is None:
        assert not can_build(), "the RMSNorm kernel should build here: see tests/test_cpu_kernels.py"
        pytest.skip("no compiler or ninja here: only the PyTorch path runs")
    return k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (33, 576), (5, 3, 128)])
def test_kernel_matches_reference(kernel, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (4 * torch.randn(*shape, generator=gen)).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    out = kernel.rms_norm(x, weight, 1e-6)
    expected = rms_norm_reference(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.bfloat16:
        # same rounding order; the float32 sum of squares may differ in its last bit only
        torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)
    else:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_strided_input_and_module_path(kernel):
    """Qwen3 normalizes q and k through views of the fused qkv output (not contiguous)."""
    qkv = torch.randn(7, 6, 32)
    view = qkv[:, 2:5]
    norm = RMSNorm(32, eps=1e-5)
    norm.weight.data = torch.randn(32)
    assert torch.equal(norm(view), rms_norm_reference(view, norm.weight, 1e-5)), "unbound: the reference"
    bind_kernels(norm, select_kernels(torch.device("cpu"), True, torch.float32, 32))  # what the runner does
    assert torch.equal(norm(view), kernel.rms_norm(view, norm.weight, 1e-5)), "bound: the C++ kernel"
    torch.testing.assert_close(norm(view), rms_norm_reference(view, norm.weight, 1e-5), atol=1e-5, rtol=1e-5)
    bind_kernels(norm, select_kernels(torch.device("cpu"), False, torch.float32, 32))
    assert torch.equal(norm(view), rms_norm_reference(view, norm.weight, 1e-5)), "fast kernels off: the reference"
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel.rms_norm(view, norm.weight.to(torch.bfloat16), 1e-5)
