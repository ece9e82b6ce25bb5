// The register-tiled AVX2 + FMA dot product and epilogue over 32-column blocks of bf16 k-pairs,
// shared by bf16_avx2_linear.cpp (bf16 weights packed at load) and int8_avx2_linear.cpp (int8
// weights widened to such blocks as they stream). Include it only where __AVX2__ and __FMA__ are
// defined.
//
//   block jb of W:  k-pair p:  n0k0 n0k1 | n1k0 n1k1 | ... | n31k0 n31k1   (128 bytes: 4 ymm)
//
//   Each ymm holds 8 columns' (k, k+1) pairs as 32-bit lanes: shifting a lane left by 16 gives
//   W[n][k] as a float32, masking its low half gives W[n][k + 1]. Up to kRowTile rows share each
//   loaded weight vector (4 accumulators a row); more rows re-read the block, which by then sits
//   in L2.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx2_math.h"
#include "linear_output.h"

namespace nanoserve_avx2 {

using nanoserve::new_output;
using nanoserve::OutRows;


constexpr int64_t kCols = 32;             // columns per block: 4 ymm of 8
constexpr int kRowTile = 3;               // 3 rows x 4 accumulators, 6 inputs, 2 weight halves
constexpr int64_t kPrefetchBytes = 4096;  // for the kernels that still prefetch their stream into L2
constexpr int64_t kPairBytes = kCols * 4;  // one k-pair of a block

enum Activation : int64_t { kNone = 0, kGeluTanh = 1 };

// Rows [0, kRows) of x (float32, row stride K) times one block -> acc (kRows x 32 floats). The
// accumulators are named scalars, not an array, so that GCC keeps them in registers (see
// bf16_dot_block.h). No software prefetch: on Zen 3 it made 1-16 rows no faster, most slower.
#define NANOSERVE_ROW_ACCUMULATORS(r) \
  __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = c##r##0, c##r##2 = c##r##0, c##r##3 = c##r##0;
#define NANOSERVE_ROW_INPUTS(r)                                                                      \
  const __m256 e##r = kRows > r ? _mm256_broadcast_ss(x + r * K + 2 * p) : _mm256_setzero_ps();      \
  const __m256 o##r = kRows > r ? _mm256_broadcast_ss(x + r * K + 2 * p + 1) : _mm256_setzero_ps();
#define NANOSERVE_COLUMN_STEP(j)                                                                     \
  {                                                                                                  \
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * j));          \
    const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));                                 \
    const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(w, high_halves));                         \
    c0##j = _mm256_fmadd_ps(o0, hi, _mm256_fmadd_ps(e0, lo, c0##j));                                 \
    if constexpr (kRows > 1) c1##j = _mm256_fmadd_ps(o1, hi, _mm256_fmadd_ps(e1, lo, c1##j));        \
    if constexpr (kRows > 2) c2##j = _mm256_fmadd_ps(o2, hi, _mm256_fmadd_ps(e2, lo, c2##j));        \
  }
#define NANOSERVE_ROW_STORE(r)                                                                       \
  if constexpr (kTiles > r) {                                                                        \
    _mm256_storeu_ps(acc + r * kCols, c##r##0), _mm256_storeu_ps(acc + r * kCols + 8, c##r##1);      \
    _mm256_storeu_ps(acc + r * kCols + 16, c##r##2), _mm256_storeu_ps(acc + r * kCols + 24, c##r##3); \
  }

template <int kRows>
void dot_block(const float* x, int64_t K, const char* block, float* acc) {
  static_assert(kRows >= 1 && kRows <= kRowTile);
  constexpr int kTiles = kRows;  // accumulator sets to store
  const __m256i high_halves = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  NANOSERVE_ROW_ACCUMULATORS(0) NANOSERVE_ROW_ACCUMULATORS(1) NANOSERVE_ROW_ACCUMULATORS(2)
  const int64_t k_pairs = K / 2;
  for (int64_t p = 0; p < k_pairs; ++p, block += kPairBytes) {
    NANOSERVE_ROW_INPUTS(0) NANOSERVE_ROW_INPUTS(1) NANOSERVE_ROW_INPUTS(2)
    NANOSERVE_COLUMN_STEP(0) NANOSERVE_COLUMN_STEP(1) NANOSERVE_COLUMN_STEP(2) NANOSERVE_COLUMN_STEP(3)
  }
  NANOSERVE_ROW_STORE(0) NANOSERVE_ROW_STORE(1) NANOSERVE_ROW_STORE(2)
}
#undef NANOSERVE_ROW_INPUTS
#undef NANOSERVE_COLUMN_STEP

using DotBlock = void (*)(const float*, int64_t, const char*, float*);
constexpr DotBlock kDotBlock[kRowTile + 1] = {nullptr, dot_block<1>, dot_block<2>, dot_block<3>};

// One row of x (float32) against kBlocks consecutive blocks read side by side (block,
// block + block_bytes, ...) -> acc (kBlocks x 32 floats): the batch-1 path. One thread streaming
// one block at a time leaves DRAM bandwidth unused; three concurrent streams per thread took
// GPT-2's batch-1 linears from ~12 to ~15-17 GB/s on a 2-core Zen 3 (where software prefetching
// made them slower). Each column's products and their order are dot_block<1>'s, so a row's
// result is the same bits either way. Block b's accumulators are dot_block's row r = b.
#define NANOSERVE_STREAM_STEP(b, j)                                                                  \
  if constexpr (kBlocks > b) {                                                                       \
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + b * block_bytes + 32 * j)); \
    const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));                                 \
    const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(w, high_halves));                         \
    c##b##j = _mm256_fmadd_ps(o, hi, _mm256_fmadd_ps(e, lo, c##b##j));                               \
  }
#define NANOSERVE_STREAM_COLUMNS(j) NANOSERVE_STREAM_STEP(0, j) NANOSERVE_STREAM_STEP(1, j) NANOSERVE_STREAM_STEP(2, j)

// 3 blocks x 4 accumulators, 2 inputs and the mask: 15 of 16 ymm (GCC loads each weight vector
// twice, for the shift and as the mask's memory operand, rather than spill)
constexpr int kStreams = 3;

template <int kBlocks>
void dot_blocks_row(const float* x, int64_t K, const char* block, int64_t block_bytes, float* acc) {
  static_assert(kBlocks >= 1 && kBlocks <= kStreams);
  constexpr int kTiles = kBlocks;  // accumulator sets to store
  const __m256i high_halves = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  NANOSERVE_ROW_ACCUMULATORS(0) NANOSERVE_ROW_ACCUMULATORS(1) NANOSERVE_ROW_ACCUMULATORS(2)
  for (int64_t p = 0; p < K / 2; ++p, block += kPairBytes) {
    const __m256 e = _mm256_broadcast_ss(x + 2 * p), o = _mm256_broadcast_ss(x + 2 * p + 1);
    NANOSERVE_STREAM_COLUMNS(0) NANOSERVE_STREAM_COLUMNS(1) NANOSERVE_STREAM_COLUMNS(2) NANOSERVE_STREAM_COLUMNS(3)
  }
  NANOSERVE_ROW_STORE(0) NANOSERVE_ROW_STORE(1) NANOSERVE_ROW_STORE(2)
}
#undef NANOSERVE_ROW_ACCUMULATORS
#undef NANOSERVE_ROW_STORE
#undef NANOSERVE_STREAM_STEP
#undef NANOSERVE_STREAM_COLUMNS

using DotBlocksRow = void (*)(const float*, int64_t, const char*, int64_t, float*);
constexpr DotBlocksRow kDotBlocksRow[kStreams + 1] = {nullptr, dot_blocks_row<1>, dot_blocks_row<2>, dot_blocks_row<3>};

// acc (rows x 32) [* scale] + bias -> activation -> columns [n0, n0 + 32) of rows [0, rows) of y
// (bf16 or float32); scale and bias (float32, per column) may be null. Columns past n_total are not written.
inline void store_block(const float* acc, int rows, const float* scale, const float* bias, int64_t activation,
                        OutRows y, int64_t ldy, int64_t n0, int64_t n_total) {
  for (int q = 0; q < 4; ++q) {
    const int64_t col = n0 + 8 * q;
    if (col >= n_total) break;
    const int64_t width = std::min<int64_t>(8, n_total - col);
    float b[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    if (bias) std::memcpy(b, bias + col, width * sizeof(float));
    if (scale) std::memcpy(s, scale + col, width * sizeof(float));
    const __m256 bv = _mm256_loadu_ps(b), sv = _mm256_loadu_ps(s);
    for (int m = 0; m < rows; ++m) {
      __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(acc + m * kCols + 8 * q), sv, bv);
      if (activation == kGeluTanh) v = gelu_tanh8(v);
      if (y.f32) {
        float* out = y.floats() + m * ldy + col;
        if (width == 8) {
          _mm256_storeu_ps(out, v);
        } else {
          alignas(32) float tail[8];
          _mm256_store_ps(tail, v);
          std::memcpy(out, tail, width * sizeof(float));
        }
        continue;
      }
      const __m128i out = float8_to_bf16(v);
      if (width == 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y.bf16() + m * ldy + col), out);
      } else {
        alignas(16) uint16_t tail[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(tail), out);
        std::memcpy(y.bf16() + m * ldy + col, tail, width * sizeof(uint16_t));
      }
    }
  }
}

// x (M, K) bf16 with unit stride over K -> float32 rows K apart, valid until the calling thread
// widens again. A bf16 is the top half of a float32. Decode-sized inputs widen into a per-thread
// buffer: ATen's `x.to(kFloat)` allocates and builds a TensorIterator, a few microseconds a call,
// and a 30-layer model makes ~120 linear calls a step. Larger inputs (prefill) go through ATen
// into `storage`.
constexpr int64_t kWidenBufferFloats = 64 * 1024;  // 256 KB a calling thread
inline const float* widen_rows(const torch::Tensor& x, torch::Tensor& storage) {
  const int64_t M = x.size(0), K = x.size(1);
  if (M * K > kWidenBufferFloats || x.stride(1) != 1) {
    storage = x.to(at::kFloat).contiguous();
    return storage.data_ptr<float>();
  }
  thread_local std::vector<float> buffer(kWidenBufferFloats + 16);
  // 64-byte aligned as ATen's allocations are: a vectorized reduction over x (the grouped kernel's
  // x_sum) then sums each row in the same order whichever way it was widened.
  float* aligned = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
  const uint16_t* rows = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* in = rows + m * x.stride(0);
    float* out = aligned + m * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + k)));
      _mm256_storeu_ps(out + k, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
    for (; k < K; ++k) {
      const uint32_t bits = static_cast<uint32_t>(in[k]) << 16;
      std::memcpy(out + k, &bits, sizeof(bits));
    }
  }
  return aligned;
}

}  // namespace nanoserve_avx2
