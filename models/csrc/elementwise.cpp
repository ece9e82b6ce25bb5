// The elementwise ops between a decoder layer's matmuls, one call each: the rotary embedding of
// q and k, and SwiGLU's SiLU-and-multiply. Each is one pass over the rows in float32 with the
// PyTorch composition's rounding (models/layers.py), where that composition is five or six small
// ATen ops; at decode batch sizes each of those costs more in dispatch than in arithmetic.
//
//   rotary:        x (N, heads, D), cos and signed_sin (N, 1, D) float32  ->  (N, heads, D), x's dtype
//                  y[d] = x[d] * cos[d] + x[(d + D/2) % D] * signed_sin[d]   ("rotate half")
//   silu_and_mul:  x (N, 2F)  ->  (N, F) = silu(x[:, :F]) * x[:, F:]
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.is_cpu(), "CPU tensors only");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "float32, bfloat16 or float16 input");
}

constexpr int64_t kGrainElements = 32768;  // elements per thread task: small batches stay on the calling thread

// One rotary row: the straight product rounded first, then the rolled one fused into the sum.
// That is how ATen's AVX2 / AVX-512 `addcmul(xf * cos, roll(xf), signed_sin)` rounds (its vector
// kernel is compiled with the multiply-add contracted), so there both paths give the same bits.
template <typename T>
void rotate_row(const T* x, const float* cos, const float* signed_sin, T* y, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float straight = static_cast<float>(x[d]) * cos[d];
    y[d] = static_cast<T>(std::fma(static_cast<float>(x[d + half]), signed_sin[d], straight));
  }
  for (int64_t d = half; d < D; ++d) {
    const float straight = static_cast<float>(x[d]) * cos[d];
    y[d] = static_cast<T>(std::fma(static_cast<float>(x[d - half]), signed_sin[d], straight));
  }
}

// One SwiGLU row: silu rounds to T before the product, as `F.silu(gate) * up` rounds. The
// exponent is capped below float32's overflow: -ffast-math divides by an approximate reciprocal,
// which turns g / inf into NaN where PyTorch gives -0 (any gate below -88.7).
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* y, int64_t F) {
  for (int64_t f = 0; f < F; ++f) {
    const float g = static_cast<float>(gate[f]);
    const T silu = static_cast<T>(g / (1.0f + std::exp(std::min(-g, 88.0f))));
    y[f] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[f]));
  }
}

}  // namespace

torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin) {
  check_input(x);
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be (N, heads, D) with unit stride over D");
  const int64_t N = x.size(0), heads = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "the head dim must be even");
  for (const auto& t : {cos, signed_sin})
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 3 && t.size(0) == N &&
                    t.size(1) == 1 && t.size(2) == D,
                "cos and signed_sin must be contiguous float32 (N, 1, D)");
  auto y = torch::empty({N, heads, D}, x.options());
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(heads * D, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {  // double: refused above
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = signed_sin.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t h = 0; h < heads; ++h)
          rotate_row(xp + n * row_stride + h * head_stride, cp + n * D, sp + n * D, yp + (n * heads + h) * D, D);
    });
  });
  return y;
}

torch::Tensor silu_and_mul(torch::Tensor x) {
  check_input(x);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x must be (N, 2F) with unit stride over 2F");
  const int64_t N = x.size(0), F = x.size(1) / 2, row_stride = x.stride(0);
  auto y = torch::empty({N, F}, x.options());
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(F, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        silu_and_mul_row(xp + n * row_stride, xp + n * row_stride + F, yp + n * F, F);
    });
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotary", &rotary, py::call_guard<py::gil_scoped_release>(), "rotate-half rotary embedding, float32 math");
  m.def("silu_and_mul", &silu_and_mul, py::call_guard<py::gil_scoped_release>(), "silu(x[:, :F]) * x[:, F:]");
}
