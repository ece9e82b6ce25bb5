// The elementwise ops between a decoder layer's matmuls, one call each: the rotary embedding of
// q and k, one pass over the rows in float32 with the PyTorch composition's rounding
// (models/layers.py), where that composition is six small ATen ops; at decode batch sizes each of
// those costs more in dispatch than in arithmetic. (SwiGLU's SiLU-and-multiply had a kernel here
// too, until commit 316fcc5's was found to round differently from ATen's silu, whose exp is
// Sleef's: one bf16 step in a logit put the default model's first greedy token across a tie.)
//
//   rotary:        x (N, heads, D), cos and signed_sin (N, 1, D) float32  ->  (N, heads, D), x's dtype
//                  y[d] = x[d] * cos[d] + x[(d + D/2) % D] * signed_sin[d]   ("rotate half")
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotary", &rotary, py::call_guard<py::gil_scoped_release>(), "rotate-half rotary embedding, float32 math");
}
