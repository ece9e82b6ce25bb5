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
//   vdpbf16ps; the A operand is x[m][k], x[m][k + 1] broadcast. The products are exact and sum in
//   fp32; the scale and bias are applied once per output in the epilogue.
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
#include <immintrin.h>

#include "avx512_math.h"

namespace {

constexpr int64_t kCols = 64;    // columns per block
constexpr int kRowTile = 6;      // 6 rows x 4 accumulators + 4 weight vectors + temporaries
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead of the stream to fetch into L2
constexpr int64_t kWidenRows = 2 * kRowTile;  // more rows than this widen each block once, into scratch

enum Activation : int64_t { kNone = 0, kGeluTanh = 1 };

// 32 int8 weights -> 32 bf16 (exact: |q| <= 127 needs 7 mantissa bits).
inline __m512bh int8x32_to_bf16(const char* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // lo in lanes 0..15, hi in 16..31
}

// acc (rows x 64 fp32) * scale + bias -> activation -> bf16 columns [n0, n0 + 64) of y.
void store_block(const __m512 (&acc)[kRowTile][4], int rows, const float* scale, const float* bias,
                 int64_t activation, at::BFloat16* y, int64_t ldy, int64_t n0, int64_t n_total) {
  for (int q = 0; q < 4; ++q) {
    const int64_t col = n0 + 16 * q;
    if (col >= n_total) break;
    const __mmask16 mask = static_cast<__mmask16>(n_total - col >= 16 ? 0xFFFF : (1u << (n_total - col)) - 1u);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scale + col);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < rows; ++m) {
      __m512 v = _mm512_fmadd_ps(acc[m][q], s, b);
      if (activation == kGeluTanh) v = gelu_tanh(v);
      _mm256_mask_storeu_epi16(y + m * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// Named accumulators, not an array, for the reason given in bf16_dot_linear.cpp (GCC would keep
// an array on the stack).
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

// kInt8: `block` is the int8 stream (128 bytes a k-pair, widened here); else a widened bf16 copy
// of one block (256 bytes a k-pair).
template <int kRows, bool kInt8>
void dot_block(const at::BFloat16* x, int64_t K, const char* block, const char* stream_end, __m512 (&acc)[kRowTile][4]) {
  static_assert(kRows >= 1 && kRows <= kRowTile);
  constexpr int64_t kPairBytes = kInt8 ? 128 : 256;
  NANOSERVE_ROW_ACCUMULATORS(0) NANOSERVE_ROW_ACCUMULATORS(1) NANOSERVE_ROW_ACCUMULATORS(2)
  NANOSERVE_ROW_ACCUMULATORS(3) NANOSERVE_ROW_ACCUMULATORS(4) NANOSERVE_ROW_ACCUMULATORS(5)
  const int64_t k_pairs = K / 2;
  for (int64_t p = 0; p < k_pairs; ++p, block += kPairBytes) {
    if (kInt8 && (p & 7) == 0 && block + kPrefetchBytes < stream_end) _mm_prefetch(block + kPrefetchBytes, _MM_HINT_T1);
    __m512bh w0, w1, w2, w3;
    if constexpr (kInt8) {
      w0 = int8x32_to_bf16(block), w1 = int8x32_to_bf16(block + 32);
      w2 = int8x32_to_bf16(block + 64), w3 = int8x32_to_bf16(block + 96);
    } else {
      w0 = (__m512bh)_mm512_loadu_si512(block), w1 = (__m512bh)_mm512_loadu_si512(block + 64);
      w2 = (__m512bh)_mm512_loadu_si512(block + 128), w3 = (__m512bh)_mm512_loadu_si512(block + 192);
    }
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
constexpr DotBlock kDotInt8[kRowTile + 1] = {nullptr, dot_block<1, true>, dot_block<2, true>, dot_block<3, true>,
                                             dot_block<4, true>, dot_block<5, true>, dot_block<6, true>};
constexpr DotBlock kDotWidened[kRowTile + 1] = {nullptr, dot_block<1, false>, dot_block<2, false>, dot_block<3, false>,
                                                dot_block<4, false>, dot_block<5, false>, dot_block<6, false>};

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
          kDotWidened[rows](xp + m0 * K, K, scratch, nullptr, acc);
        } else {
          kDotInt8[rows](xp + m0 * K, K, block, stream_end, acc);
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
  m.def("int8_linear", &int8_linear,
        "y = act((x @ Q^T) * scale + b) for an int8 weight in 64-column blocks of k-pairs");
}
