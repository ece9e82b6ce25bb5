// Small-batch bf16 linear layers with AVX512-BF16 dot products, for CPUs without AMX tiles (AMD
// EPYC Zen 4/5, Intel Cooper Lake), reading the weight oneDNN already packed for them.
//
// A decode step multiplies a few rows of activations by every weight once, so it is bound by
// streaming the weights; oneDNN's brgemm streams them slowly at small M. This kernel walks each
// thread's share of the weight as one contiguous stream and keeps the activations in registers.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 (float32 with float_output) = x @ W^T + bias, optional GELU(tanh)
//   W packed by oneDNN (on these CPUs) as 64-column blocks, k-pairs inside (N padded to 64):
//     W[n][k] at (n / 64) * (K * 64) + (k / 2) * 128 + (n % 64) * 2 + k % 2
//
//     block jb:  k-pair 0:  n0k0 n0k1 | n1k0 n1k1 | ... | n63k0 n63k1   (256 bytes: 4 zmm)
//                k-pair 1:  ...
//
//   The dot product and epilogue are bf16_dot_block.h's, shared with the int8 kernel. The Python
//   side checks the packed layout against this formula.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_dot_block.h"

using namespace nanoserve;

bool bf16_dot_available() { return true; }

torch::Tensor bf16_dot_linear(torch::Tensor x, int64_t weight_address, int64_t weight_nbytes,
                              c10::optional<torch::Tensor> bias, int64_t N, int64_t activation, bool float_output) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t n_blocks = (N + kCols - 1) / kCols;  // oneDNN pads N to whole blocks
  TORCH_CHECK(K % 2 == 0, "K must be even");
  TORCH_CHECK(weight_address != 0 && weight_nbytes >= n_blocks * kCols * K * 2, "packed weight too small for (N, K)");
  const float* bp = nullptr;  // float32, converted once by the caller
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
    bp = bias->data_ptr<float>();
  }
  auto y = new_output(x, M, N, float_output);
  const char* w = reinterpret_cast<const char*>(weight_address);
  const int64_t block_bytes = K * kCols * 2;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const OutRows yp = OutRows::of(y);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const char* stream_end = w + end * block_bytes;
    __m512 acc[kRowTile][4];
    for (int64_t jb = begin; jb < end; ++jb) {
      const char* block = w + jb * block_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
        kDotBlock<Weights::kBf16>[rows](xp + m0 * K, K, block, stream_end, acc);
        store_block(acc, rows, nullptr, bp, activation, yp + m0 * N, N, jb * kCols, N);
      }
    }
  });
  return y;
}

#else  // built without AVX512-BF16: the Python side keeps oneDNN

bool bf16_dot_available() { return false; }

torch::Tensor bf16_dot_linear(torch::Tensor, int64_t, int64_t, c10::optional<torch::Tensor>, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AVX512-BF16 support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_dot_available", &bf16_dot_available, "whether this build has the AVX512-BF16 path");
  m.def("bf16_dot_linear", &bf16_dot_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("weight_address"), py::arg("weight_nbytes"), py::arg("bias"), py::arg("N"),
        py::arg("activation"), py::arg("float_output") = false,
        "y = act(x @ W^T + b) for a bf16 weight oneDNN packed in 64-column blocks of k-pairs");
}
