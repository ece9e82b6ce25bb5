// bf16 linear layers with AVX2 + FMA, for CPUs without AVX-512 (AMD EPYC Zen 2/3, older Intel).
//
// oneDNN has no bf16 path on these CPUs (it refuses to pack bf16 weights, and ATen's bf16 matmul
// runs ~3x slower than float32), so this kernel owns its weight: packed once at load in 32-column
// blocks of k-pairs, it streams each thread's share as one contiguous run, widening bf16 to
// float32 in registers (a bf16 is the top half of a float32), and accumulates in float32.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 (float32 with float_output) = x @ W^T + bias, optional GELU(tanh)
//   W packed as 32-column blocks, k-pairs inside (N padded to 32; models/fast_linear.py, PAIRS32):
//     W[n][k] at (n / 32) * (K * 32) + (k / 2) * 64 + (n % 32) * 2 + k % 2
//
//     block jb:  k-pair p:  n0k0 n0k1 | n1k0 n1k1 | ... | n31k0 n31k1   (128 bytes: 4 ymm)
//
//   The dot product and epilogue are bf16_avx2_block.h's, shared with the AVX2 int8 kernel. The
//   kernel takes every row count, prefill included; one row (batch 1) streams three blocks side by
//   side (dot_blocks_row), more rows run register tiles of up to three rows over one block.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include "bf16_avx2_block.h"

using namespace nanoserve_avx2;

bool bf16_avx2_available() { return true; }

torch::Tensor bf16_avx2_linear(torch::Tensor x, int64_t weight_address, int64_t weight_nbytes,
                               c10::optional<torch::Tensor> bias, int64_t N, int64_t activation, bool float_output) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t n_blocks = (N + kCols - 1) / kCols;
  TORCH_CHECK(K % 2 == 0, "K must be even");
  TORCH_CHECK(weight_address != 0 && weight_nbytes >= n_blocks * kCols * K * 2, "packed weight too small for (N, K)");
  const float* bp = nullptr;  // float32, converted once by the caller
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
    bp = bias->data_ptr<float>();
  }
  torch::Tensor widened;
  const float* xp = widen_rows(x, widened);  // (M, K) float32: widened once, broadcast from L1
  auto y = new_output(x, M, N, float_output);
  const char* w = reinterpret_cast<const char*>(weight_address);
  const int64_t block_bytes = K * kPairBytes / 2;
  const OutRows yp = OutRows::of(y);
  if (M == 1) {  // batch 1: kStreams blocks side by side
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(32) float acc[kStreams * kCols];
      for (int64_t jb = begin; jb < end; jb += kStreams) {
        const int blocks = static_cast<int>(std::min<int64_t>(kStreams, end - jb));
        kDotBlocksRow[blocks](xp, K, w + jb * block_bytes, block_bytes, acc);
        for (int b = 0; b < blocks; ++b) store_block(acc + b * kCols, 1, nullptr, bp, activation, yp, N, (jb + b) * kCols, N);
      }
    });
    return y;
  }
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float acc[kRowTile * kCols];
    for (int64_t jb = begin; jb < end; ++jb) {
      const char* block = w + jb * block_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
        kDotBlock[rows](xp + m0 * K, K, block, acc);
        store_block(acc, rows, nullptr, bp, activation, yp + m0 * N, N, jb * kCols, N);
      }
    }
  });
  return y;
}

#else  // built without AVX2 + FMA: the Python side keeps PyTorch's matmul

bool bf16_avx2_available() { return false; }

torch::Tensor bf16_avx2_linear(torch::Tensor, int64_t, int64_t, c10::optional<torch::Tensor>, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AVX2 + FMA support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_avx2_available", &bf16_avx2_available, "whether this build has the AVX2 + FMA path");
  m.def("bf16_avx2_linear", &bf16_avx2_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("weight_address"), py::arg("weight_nbytes"), py::arg("bias"), py::arg("N"),
        py::arg("activation"), py::arg("float_output") = false,
        "y = act(x @ W^T + b) for a bf16 weight packed in 32-column blocks of k-pairs");
}
