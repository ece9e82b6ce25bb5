// RMSNorm over the last dimension, one pass of float32 math per row, in Hugging Face's rounding
// order (Llama/Qwen): y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)).
//
// The PyTorch composition is eight small ops per norm; at decode batch sizes each costs more in
// dispatch than in arithmetic, and Qwen-family models run two norms per layer (61 in SmolLM2).
//
//   x (..., C)   weight (C,)   ->   y (..., C), same dtype as x
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

template <typename T>
static void rms_norm_rows(const T* x, const T* weight, T* y, int64_t begin, int64_t end, int64_t C, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    float sum_sq = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float v = static_cast<float>(xr[c]);
      sum_sq += v * v;
    }
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(C) + eps);
    for (int64_t c = 0; c < C; ++c) {
      const T normed = static_cast<T>(static_cast<float>(xr[c]) * inv_rms);  // rounded to x's dtype first
      yr[c] = static_cast<T>(static_cast<float>(weight[c]) * static_cast<float>(normed));
    }
  }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "weight must be (C,) for x (..., C)");
  x = x.contiguous();
  weight = weight.contiguous();
  auto y = torch::empty_like(x);
  const int64_t C = x.size(-1), rows = x.numel() / std::max<int64_t>(C, 1);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));  // small batches stay on one thread
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      rms_norm_rows<scalar_t>(xp, wp, yp, begin, end, C, static_cast<float>(eps));
    });
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>(), "RMSNorm over the last dim, HF rounding order");
}
