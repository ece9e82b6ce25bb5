// Small-batch bf16 linear layers with AVX512-BF16 dot products, for CPUs without AMX tiles (AMD
// EPYC Zen 4/5, Intel Cooper Lake), reading the weight oneDNN already packed for them.
//
// A decode step multiplies a few rows of activations by every weight once, so it is bound by
// streaming the weights; oneDNN's brgemm streams them slowly at small M. This kernel walks each
// thread's share of the weight as one contiguous stream and keeps the activations in registers.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 = x @ W^T + bias, optional GELU(tanh)
//   W packed by oneDNN (on these CPUs) as 64-column blocks, k-pairs inside (N padded to 64):
//     W[n][k] at (n / 64) * (K * 64) + (k / 2) * 128 + (n % 64) * 2 + k % 2
//
//     block jb:  k-pair 0:  n0k0 n0k1 | n1k0 n1k1 | ... | n63k0 n63k1   (256 bytes: 4 zmm)
//                k-pair 1:  ...
//
//   One k-pair row is four 64-byte vectors of 16 (column, k-pair) lanes, exactly the B operand
//   of vdpbf16ps; the A operand is x[m][k], x[m][k + 1] broadcast to all lanes. Up to kRowTile
//   rows share each loaded weight vector (4 accumulators a row); more rows re-read the block,
//   which by then sits in L2. The Python side checks the packed layout against this formula.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "avx512_math.h"

namespace {

constexpr int64_t kCols = 64;    // columns per packed block
constexpr int kRowTile = 6;      // 6 rows x 4 accumulators + 4 weight vectors: 28 of 32 zmm
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead of the stream to fetch into L2

enum Activation : int64_t { kNone = 0, kGeluTanh = 1 };

// acc (rows x 64 fp32) + bias -> activation -> bf16 columns [n0, n0 + 64) of rows [0, rows) of y.
void store_block(const __m512 (&acc)[kRowTile][4], int rows, const float* bias, int64_t activation,
                 at::BFloat16* y, int64_t ldy, int64_t n0, int64_t n_total) {
  for (int q = 0; q < 4; ++q) {
    const int64_t col = n0 + 16 * q;
    if (col >= n_total) break;
    const __mmask16 mask = static_cast<__mmask16>(n_total - col >= 16 ? 0xFFFF : (1u << (n_total - col)) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < rows; ++m) {
      __m512 v = _mm512_add_ps(acc[m][q], b);
      if (activation == kGeluTanh) v = gelu_tanh(v);
      _mm256_mask_storeu_epi16(y + m * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// Rows [0, kRows) of x (row stride K) times one packed block -> acc. The accumulators are named
// scalars, not an array: the vector loads may alias anything (the intrinsics' types are
// may_alias), and GCC then stores an accumulator array to the stack on every k-pair.
#define NANOSERVE_ROW_ACCUMULATORS(r) \
  __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define NANOSERVE_ROW_STEP(r)                                                   \
  if constexpr (kRows > r) {                                                    \
    int32_t pair;                                                               \
    std::memcpy(&pair, x + r * K + 2 * p, sizeof(pair));                        \
    const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);                       \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, a, w0);                                 \
    c##r##1 = _mm512_dpbf16_ps(c##r##1, a, w1);                                 \
    c##r##2 = _mm512_dpbf16_ps(c##r##2, a, w2);                                 \
    c##r##3 = _mm512_dpbf16_ps(c##r##3, a, w3);                                 \
  }
#define NANOSERVE_ROW_STORE(r) \
  if constexpr (kRows > r) { acc[r][0] = c##r##0; acc[r][1] = c##r##1; acc[r][2] = c##r##2; acc[r][3] = c##r##3; }

template <int kRows>
void dot_block(const at::BFloat16* x, int64_t K, const char* block, const char* stream_end, __m512 (&acc)[kRowTile][4]) {
  static_assert(kRows >= 1 && kRows <= kRowTile);
  NANOSERVE_ROW_ACCUMULATORS(0) NANOSERVE_ROW_ACCUMULATORS(1) NANOSERVE_ROW_ACCUMULATORS(2)
  NANOSERVE_ROW_ACCUMULATORS(3) NANOSERVE_ROW_ACCUMULATORS(4) NANOSERVE_ROW_ACCUMULATORS(5)
  const int64_t k_pairs = K / 2;
  for (int64_t p = 0; p < k_pairs; ++p, block += 256) {
    if ((p & 3) == 0 && block + kPrefetchBytes < stream_end) _mm_prefetch(block + kPrefetchBytes, _MM_HINT_T1);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(block);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(block + 64);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(block + 128);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(block + 192);
    NANOSERVE_ROW_STEP(0) NANOSERVE_ROW_STEP(1) NANOSERVE_ROW_STEP(2)
    NANOSERVE_ROW_STEP(3) NANOSERVE_ROW_STEP(4) NANOSERVE_ROW_STEP(5)
  }
  NANOSERVE_ROW_STORE(0) NANOSERVE_ROW_STORE(1) NANOSERVE_ROW_STORE(2)
  NANOSERVE_ROW_STORE(3) NANOSERVE_ROW_STORE(4) NANOSERVE_ROW_STORE(5)
}
#undef NANOSERVE_ROW_ACCUMULATORS
#undef NANOSERVE_ROW_STEP
#undef NANOSERVE_ROW_STORE

using DotBlock = void (*)(const at::BFloat16*, int64_t, const char*, const char*, __m512 (&)[kRowTile][4]);
constexpr DotBlock kDotBlock[kRowTile + 1] = {nullptr, dot_block<1>, dot_block<2>, dot_block<3>,
                                              dot_block<4>, dot_block<5>, dot_block<6>};

}  // namespace

bool bf16_dot_available() { return true; }

torch::Tensor bf16_dot_linear(torch::Tensor x, int64_t weight_address, int64_t weight_nbytes,
                              c10::optional<torch::Tensor> bias, int64_t N, int64_t activation) {
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
  auto y = torch::empty({M, N}, x.options());
  const char* w = reinterpret_cast<const char*>(weight_address);
  const int64_t block_bytes = K * kCols * 2;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const char* stream_end = w + end * block_bytes;
    __m512 acc[kRowTile][4];
    for (int64_t jb = begin; jb < end; ++jb) {
      const char* block = w + jb * block_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
        kDotBlock[rows](xp + m0 * K, K, block, stream_end, acc);
        store_block(acc, rows, bp, activation, yp + m0 * N, N, jb * kCols, N);
      }
    }
  });
  return y;
}

#else  // built without AVX512-BF16: the Python side keeps oneDNN

bool bf16_dot_available() { return false; }

torch::Tensor bf16_dot_linear(torch::Tensor, int64_t, int64_t, c10::optional<torch::Tensor>, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AVX512-BF16 support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_dot_available", &bf16_dot_available, "whether this build has the AVX512-BF16 path");
  m.def("bf16_dot_linear", &bf16_dot_linear,
        "y = act(x @ W^T + b) for a bf16 weight oneDNN packed in 64-column blocks of k-pairs");
}
