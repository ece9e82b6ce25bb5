// Linear layers over int8 weights (one fp32 scale per output channel) with AVX2 + FMA, for CPUs
// without AVX-512, where int8_linear.cpp does not build. Half the bytes of bf16 stream from
// memory; the widening happens in cache.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 (float32 with float_output)
//                               = (x @ Q^T) * scale + bias, optional GELU(tanh)
//   Q int8 in int8_linear.cpp's layout: 64-column blocks of k-pairs (N padded to 64, K even):
//     Q[n][k] at (n / 64) * (K * 64) + (k / 2) * 128 + (n % 64) * 2 + k % 2
//
//   One row (batch 1) widens each block in registers as it streams (dot_int8_block_row). More
//   rows widen each 64-column block once (exact: |q| <= 127 needs 7 mantissa bits) into two
//   32-column bf16 blocks of bf16_avx2_block.h's layout, in a per-thread scratch that stays in L2,
//   and every row tile reads that. The scale and bias are applied once per output in the
//   epilogue. The products and their order do not depend on M, so neither does a row's result.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include "bf16_avx2_block.h"

using namespace nanoserve_avx2;

namespace {

constexpr int64_t kInt8Cols = 2 * kCols;        // columns per int8 block: two bf16 blocks
constexpr int64_t kInt8PairBytes = kInt8Cols * 2;  // one k-pair of an int8 block

// One int8 block (K/2 k-pairs of 128 bytes) -> two bf16 blocks of 32 columns (K/2 k-pairs of 128
// bytes each) at out and out + K * 64. stream_end: the end of this thread's int8 stream. The
// sparse prefetch pays here (4-row batches ~10% faster on Zen 3), not in dot_int8_block_row.
void widen_block(const char* block, int64_t K, char* out, const char* stream_end) {
  const int64_t half_bytes = K * kCols * 2;
  for (int64_t p = 0; p < K / 2; ++p, block += kInt8PairBytes) {
    if (p % 8 == 0 && block + kPrefetchBytes < stream_end) _mm_prefetch(block + kPrefetchBytes, _MM_HINT_T1);
    for (int half = 0; half < 2; ++half) {
      char* dst = out + half * half_bytes + p * kPairBytes;
      for (int i = 0; i < 64; i += 8) {  // 8 int8 -> 8 float32 -> their top halves, the bf16s
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 64 * half + i));
        const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))), 16);
        const __m128i bf16 = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), bf16);
      }
    }
  }
}

// One row of x (float32) against one whole int8 block (64 columns), widening in registers: the
// batch-1 path, which reads each weight byte once and writes no scratch. Each 16 bytes (8
// columns' k-pairs) sign-extend as int16 lanes: a lane's high byte is the column's k+1 value
// (shift right by 8), its low byte the k value (shift left by 24, then right by 24). The
// products and their order are dot_block<1>'s on the widened block, so a row's result is the
// same bits as through the scratch. acc: 64 floats, columns in order.
#define NANOSERVE_INT8_COLUMN_STEP(j)                                                                \
  {                                                                                                  \
    const __m256i v = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * j))); \
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));           \
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 8));                                   \
    c##j = _mm256_fmadd_ps(o, hi, _mm256_fmadd_ps(e, lo, c##j));                                     \
  }

void dot_int8_block_row(const float* x, int64_t K, const char* block, float* acc) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (int64_t p = 0; p < K / 2; ++p, block += kInt8PairBytes) {
    const __m256 e = _mm256_broadcast_ss(x + 2 * p), o = _mm256_broadcast_ss(x + 2 * p + 1);
    NANOSERVE_INT8_COLUMN_STEP(0) NANOSERVE_INT8_COLUMN_STEP(1) NANOSERVE_INT8_COLUMN_STEP(2) NANOSERVE_INT8_COLUMN_STEP(3)
    NANOSERVE_INT8_COLUMN_STEP(4) NANOSERVE_INT8_COLUMN_STEP(5) NANOSERVE_INT8_COLUMN_STEP(6) NANOSERVE_INT8_COLUMN_STEP(7)
  }
  _mm256_storeu_ps(acc, c0), _mm256_storeu_ps(acc + 8, c1), _mm256_storeu_ps(acc + 16, c2), _mm256_storeu_ps(acc + 24, c3);
  _mm256_storeu_ps(acc + 32, c4), _mm256_storeu_ps(acc + 40, c5), _mm256_storeu_ps(acc + 48, c6), _mm256_storeu_ps(acc + 56, c7);
}
#undef NANOSERVE_INT8_COLUMN_STEP

}  // namespace

bool int8_avx2_available() { return true; }

torch::Tensor int8_avx2_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                               c10::optional<torch::Tensor> bias, int64_t N, int64_t activation, bool float_output) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t n_blocks = (N + kInt8Cols - 1) / kInt8Cols;
  TORCH_CHECK(K % 2 == 0, "K must be even");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.numel() == n_blocks * kInt8Cols * K,
              "int8 weight of (N padded to 64) x K elements in 64-column blocks");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N, "float32 (N,) scale");
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
    bp = bias->data_ptr<float>();
  }
  torch::Tensor widened;
  const float* xp = widen_rows(x, widened);  // (M, K) float32: widened once, broadcast from L1
  auto y = new_output(x, M, N, float_output);
  const char* w = reinterpret_cast<const char*>(qweight.data_ptr<int8_t>());
  const float* sp = scale.data_ptr<float>();
  const int64_t block_bytes = K * kInt8Cols;
  const OutRows yp = OutRows::of(y);
  if (M == 1) {  // batch 1: widen in registers, no scratch
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(32) float acc[kInt8Cols];
      for (int64_t jb = begin; jb < end; ++jb) {
        dot_int8_block_row(xp, K, w + jb * block_bytes, acc);
        for (int half = 0; half < 2 && jb * kInt8Cols + half * kCols < N; ++half)
          store_block(acc + half * kCols, 1, sp, bp, activation, yp, N, jb * kInt8Cols + half * kCols, N);
      }
    });
    return y;
  }
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const char* stream_end = w + end * block_bytes;
    alignas(32) float acc[kRowTile * kCols];
    std::vector<uint16_t> widened(K * kInt8Cols);  // one int8 block as two bf16 blocks, per thread
    char* scratch = reinterpret_cast<char*>(widened.data());
    for (int64_t jb = begin; jb < end; ++jb) {
      widen_block(w + jb * block_bytes, K, scratch, stream_end);
      for (int half = 0; half < 2; ++half) {
        const int64_t n0 = jb * kInt8Cols + half * kCols;
        if (n0 >= N) break;
        for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
          const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
          kDotBlock[rows](xp + m0 * K, K, scratch + half * K * kCols * 2, acc);
          store_block(acc, rows, sp, bp, activation, yp + m0 * N, N, n0, N);
        }
      }
    }
  });
  return y;
}

#else  // built without AVX2 + FMA: the Python side keeps its PyTorch path

bool int8_avx2_available() { return false; }

torch::Tensor int8_avx2_linear(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t,
                               int64_t, bool) {
  TORCH_CHECK(false, "built without AVX2 + FMA support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_avx2_available", &int8_avx2_available, "whether this build has the AVX2 + FMA path");
  m.def("int8_avx2_linear", &int8_avx2_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("N"), py::arg("activation"),
        py::arg("float_output") = false,
        "y = act((x @ Q^T) * scale + b) for per-channel int8 weights in 64-column blocks of k-pairs");
}
