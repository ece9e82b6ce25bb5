// The register-tiled AVX512-BF16 dot product and epilogue shared by the small-batch linears over
// 64-column blocks of k-pairs: bf16_dot_linear.cpp (bf16 weights oneDNN packed), int8_linear.cpp
// (int8 weights widened to bf16 as they stream) and int4_linear.cpp (its epilogue). Include it
// only where __AVX512BF16__ and __AVX512BW__ are defined.
//
//   block jb of W:  k-pair p:  n0k0 n0k1 | n1k0 n1k1 | ... | n63k0 n63k1   (4 vectors of 32 bf16)
//
//   Each k-pair row is the B operand of vdpbf16ps for 4 x 16 columns; the A operand is x[m][k],
//   x[m][k + 1] broadcast to all lanes. Up to kRowTile rows share each loaded weight vector
//   (4 accumulators a row); more rows re-read the block, which by then sits in L2.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "avx512_math.h"
#include "linear_output.h"

namespace nanoserve {

constexpr int64_t kCols = 64;             // columns per block
constexpr int kRowTile = 6;               // 6 rows x 4 accumulators + 4 weight vectors: 28 of 32 zmm
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead of the weight stream to fetch into L2

enum Activation : int64_t { kNone = 0, kGeluTanh = 1 };

// 32 int8 weights -> 32 bf16 (exact: |q| <= 127 needs 7 mantissa bits).
inline __m512bh int8x32_to_bf16(const char* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // lo in lanes 0..15, hi in 16..31
}

// acc (rows x 64 fp32) [* scale] + bias -> activation -> columns [n0, n0 + 64) of rows [0, rows)
// of y (bf16 or float32); scale and bias (fp32, per column) may be null. Columns past n_total are masked.
template <int kTile>
void store_block(const __m512 (&acc)[kTile][4], int rows, const float* scale, const float* bias,
                 int64_t activation, OutRows y, int64_t ldy, int64_t n0, int64_t n_total) {
  for (int q = 0; q < 4; ++q) {
    const int64_t col = n0 + 16 * q;
    if (col >= n_total) break;
    const __mmask16 mask = static_cast<__mmask16>(n_total - col >= 16 ? 0xFFFF : (1u << (n_total - col)) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < rows; ++m) {
      __m512 v = scale ? _mm512_fmadd_ps(acc[m][q], _mm512_maskz_loadu_ps(mask, scale + col), b)
                       : _mm512_add_ps(acc[m][q], b);
      if (activation == kGeluTanh) v = gelu_tanh(v);
      if (y.f32) _mm512_mask_storeu_ps(y.floats() + m * ldy + col, mask, v);
      else _mm256_mask_storeu_epi16(y.bf16() + m * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

enum class Weights { kBf16, kInt8 };  // 256 or 128 bytes a k-pair

// Rows [0, kRows) of x (row stride K) times one block -> acc. stream_end: the end of this thread's
// weight stream, for prefetching (nullptr: the block is an L2-resident copy, nothing to fetch).
// The accumulators are named scalars, not an array: the vector loads may alias anything (the
// intrinsics' types are may_alias), and GCC then stores an accumulator array to the stack on
// every k-pair.
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

template <int kRows, Weights kWeights>
void dot_block(const at::BFloat16* x, int64_t K, const char* block, const char* stream_end, __m512 (&acc)[kRowTile][4]) {
  static_assert(kRows >= 1 && kRows <= kRowTile);
  constexpr int64_t kPairBytes = kWeights == Weights::kInt8 ? 128 : 256;
  constexpr int64_t kPairsPerPrefetch = 1024 / kPairBytes;  // one 1 KiB step of the stream at a time
  NANOSERVE_ROW_ACCUMULATORS(0) NANOSERVE_ROW_ACCUMULATORS(1) NANOSERVE_ROW_ACCUMULATORS(2)
  NANOSERVE_ROW_ACCUMULATORS(3) NANOSERVE_ROW_ACCUMULATORS(4) NANOSERVE_ROW_ACCUMULATORS(5)
  const int64_t k_pairs = K / 2;
  for (int64_t p = 0; p < k_pairs; ++p, block += kPairBytes) {
    if (stream_end && p % kPairsPerPrefetch == 0 && block + kPrefetchBytes < stream_end) {
      _mm_prefetch(block + kPrefetchBytes, _MM_HINT_T1);
    }
    __m512bh w0, w1, w2, w3;
    if constexpr (kWeights == Weights::kInt8) {
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

// dot_block for 1..kRowTile rows, indexed by the row count.
template <Weights kWeights>
constexpr DotBlock kDotBlock[kRowTile + 1] = {nullptr, dot_block<1, kWeights>, dot_block<2, kWeights>,
                                              dot_block<3, kWeights>, dot_block<4, kWeights>,
                                              dot_block<5, kWeights>, dot_block<6, kWeights>};

}  // namespace nanoserve
