// Linear layers over int8 weights (weight-only quantization, one fp32 scale per output
// channel), dequantized in registers: the int8 stream is half the bytes of bf16, and decode steps
// are bound by streaming the weights. Needs AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake and every
// AMX CPU); elsewhere the Python side keeps its PyTorch reference path.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 = (x @ Q^T) * scale + bias, optional GELU(tanh)
//   Q int8, laid out as 64-column blocks of k-pairs (N padded to 64, K even), the layout
//   models/csrc/bf16_dot_linear.cpp reads, one byte per weight instead of two:
//     Q[n][k] at (n / 64) * (K * 64) + (k / 2) * 128 + (n % 64) * 2 + k % 2
//
//   Each k-pair row is 128 bytes: 4 groups of 32 int8, (column, k) interleaved. A group becomes
//   one vector of 32 bf16 (int8 -> int32 -> fp32 -> bf16, all exact), the B operand of
//   bf16_dot_block.h's dot product. The products are exact and sum in fp32; the scale and bias
//   are applied once per output in the epilogue.
//
//   Widening costs 5 instructions per 32 weights, as many as 5 rows of dot products. Up to
//   kWidenRows rows widen in registers as they stream (once per row tile); more rows (prefill,
//   big decode batches) widen each 64-column block once into a bf16 scratch that stays in L2,
//   and every row tile reads that.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_dot_block.h"

using namespace nanoserve;

namespace {

constexpr int64_t kWidenRows = 2 * kRowTile;  // more rows than this widen each block once, into scratch

// One int8 block (K/2 k-pairs of 128 bytes) -> the same block in bf16 (256 bytes a k-pair).
void widen_block(const char* block, int64_t K, char* out) {
  for (int64_t i = 0; i < K * kCols; i += 32) {
    _mm512_storeu_si512(out + 2 * i, (__m512i)int8x32_to_bf16(block + i));
  }
}

}  // namespace

bool int8_linear_available() { return true; }

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                          c10::optional<torch::Tensor> bias, int64_t N, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t n_blocks = (N + kCols - 1) / kCols;
  TORCH_CHECK(K % 2 == 0, "K must be even");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.numel() == n_blocks * kCols * K,
              "int8 weight of (N padded to 64) x K elements in 64-column blocks");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N, "float32 (N,) scale");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
    bp = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const char* w = reinterpret_cast<const char*>(qweight.data_ptr<int8_t>());
  const float* sp = scale.data_ptr<float>();
  const int64_t block_bytes = K * kCols;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const char* stream_end = w + end * block_bytes;
    __m512 acc[kRowTile][4];
    std::vector<at::BFloat16> widened(M > kWidenRows ? K * kCols : 0);  // one block in bf16, per thread
    char* scratch = reinterpret_cast<char*>(widened.data());
    for (int64_t jb = begin; jb < end; ++jb) {
      const char* block = w + jb * block_bytes;
      if (M > kWidenRows) widen_block(block, K, scratch);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
        if (M > kWidenRows) {
          kDotBlock<Weights::kBf16>[rows](xp + m0 * K, K, scratch, nullptr, acc);
        } else {
          kDotBlock<Weights::kInt8>[rows](xp + m0 * K, K, block, stream_end, acc);
        }
        store_block(acc, rows, sp, bp, activation, yp + m0 * N, N, jb * kCols, N);
      }
    }
  });
  return y;
}

#else  // built without AVX512-BF16: the Python side keeps its PyTorch path

bool int8_linear_available() { return false; }

torch::Tensor int8_linear(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AVX512-BF16 support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear_available", &int8_linear_available, "whether this build has the AVX512-BF16 path");
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>(),
        "y = act((x @ Q^T) * scale + b) for an int8 weight in 64-column blocks of k-pairs");
}
