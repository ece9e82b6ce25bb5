// Linear layers over group-quantized weights with AVX2 + FMA, for CPUs without AVX512-BF16, where
// int4_linear.cpp and int8_linear.cpp's grouped kernel do not build: 4-bit (w = d v + m, GGUF's
// Q4_0 / Q4_1 and --quantization int4) and grouped int8 (w = d q, GGUF's Q8_0). Same storage as
// those kernels, read as stored: the 4-bit stream is a quarter of bf16's bytes, Q8_0's half.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 (float32 with float_output) = x @ W^T + bias, optional GELU(tanh)
//   64-column blocks (N padded to 64) of k-pairs; per block and group g of G along K, an fp16
//   scale d (and for 4-bit a minimum m) per column: scale, minimum (N / 64, K / G, 64) fp16.
//     4-bit: 64 bytes a k-pair, 32 little-endian words; word i holds column 16 j + i / 2 at
//            k = 2 p + i % 2 in nibble j. A 32-bit lane of a 256-bit load is one column's
//            (k, k + 1) word pair, so masking nibble j in place gives 16^j v for the even k and,
//            after one shift by 16, for the odd k (the 16^-j goes into that group's scale).
//     int8:  128 bytes a k-pair, column n's (k, k + 1) at bytes 2 n, 2 n + 1.
//
//   Per row, group and column: s = sum over the group's k-pairs of x_k v_k + x_k+1 v_k+1 in
//   float32 (one FMA chain, k-pairs in order), then total += d s (+ m * sum of x over the group).
//   One row (batch 1) widens in registers as the weights stream. More rows widen each group of
//   a block once into a float32 scratch (8 KB at G = 32, in L1) that every 6-row tile reads: the same products and
//   sums in the same order, so a row's result does not depend on its batch, bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "bf16_avx2_block.h"

namespace {

using nanoserve_avx2::kPrefetchBytes;  // every line: it pays here
using nanoserve_avx2::new_output;
using nanoserve_avx2::OutRows;
using nanoserve_avx2::store_block;
using nanoserve_avx2::widen_rows;

constexpr int64_t kBlockCols = 64;   // columns per block: 8 accumulators of 8
constexpr int64_t kHalfCols = 32;    // store_block's width
constexpr int kTileRows = 6;         // scratch path: 6 rows x 2 accumulators, per 16 columns
constexpr int64_t kChunkRows = 48;   // scratch path: rows whose totals stay in L1 while groups pass

// 4-bit: one k-pair (64 bytes) -> 16^j v for columns 8 a .. 8 a + 7, a = 2 j + half, even and odd k.
struct Nibbles {
  static constexpr int64_t kPairBytes = 64;
  static constexpr bool kHasMinimum = true;
  static constexpr float kUnscale[8] = {1.0f, 1.0f, 1.0f / 16, 1.0f / 16, 1.0f / 256, 1.0f / 256, 1.0f / 4096, 1.0f / 4096};

  static inline void widen(const char* pair, __m256 (&even)[8], __m256 (&odd)[8]) {
    for (int half = 0; half < 2; ++half) {
      const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair + 32 * half));
      const __m256i high = _mm256_srli_epi32(lanes, 16);
      for (int j = 0; j < 4; ++j) {
        const __m256i mask = _mm256_set1_epi32(0xF << (4 * j));
        even[2 * j + half] = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, mask));
        odd[2 * j + half] = _mm256_cvtepi32_ps(_mm256_and_si256(high, mask));
      }
    }
  }
};

// int8: one k-pair (128 bytes) -> q for columns 8 a .. 8 a + 7, even and odd k. Each 16 bytes
// sign-extend as int16 lanes: the high byte is the odd k's q, the low byte the even k's.
struct Int8s {
  static constexpr int64_t kPairBytes = 128;
  static constexpr bool kHasMinimum = false;
  static constexpr float kUnscale[8] = {1, 1, 1, 1, 1, 1, 1, 1};

  static inline void widen(const char* pair, __m256 (&even)[8], __m256 (&odd)[8]) {
    for (int a = 0; a < 8; ++a) {
      const __m256i v = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16 * a)));
      even[a] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
      odd[a] = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 8));
    }
  }
};

// A group's per-column factors in float32: d (unscaled for the nibble's 16^j) and m.
template <class Format>
struct GroupFactors {
  alignas(32) float d[kBlockCols];
  alignas(32) float m[kBlockCols];

  void load(const at::Half* scale, const at::Half* minimum) {
    for (int a = 0; a < 8; ++a) {
      const __m256 ds = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + 8 * a)));
      _mm256_store_ps(d + 8 * a, _mm256_mul_ps(ds, _mm256_set1_ps(Format::kUnscale[a])));
      if constexpr (Format::kHasMinimum)
        _mm256_store_ps(m + 8 * a, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(minimum + 8 * a))));
    }
  }
};

// total = d s (+ m x_sum) + total, for 8 columns: the one epilogue both paths use.
template <class Format>
inline __m256 fold(__m256 total, __m256 s, const float* d, const float* m, float x_sum) {
  if constexpr (Format::kHasMinimum) total = _mm256_fmadd_ps(_mm256_load_ps(m), _mm256_set1_ps(x_sum), total);
  return _mm256_fmadd_ps(_mm256_load_ps(d), s, total);
}

// Batch 1: one row against one block, widening each k-pair in registers. totals: 64 floats
// (columns in order). x_sum: the row's sum per group (4-bit only).
template <class Format>
void dot_block_row(const float* x, int64_t K, int64_t G, const char* block, const at::Half* scale,
                   const at::Half* minimum, const float* x_sum, const char* stream_end, float* totals) {
  const int64_t groups = K / G, pairs_per_group = G / 2;
  for (int a = 0; a < 8; ++a) _mm256_storeu_ps(totals + 8 * a, _mm256_setzero_ps());
  GroupFactors<Format> f;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 s[8];
    for (int a = 0; a < 8; ++a) s[a] = _mm256_setzero_ps();
    for (int64_t pp = 0; pp < pairs_per_group; ++pp, block += Format::kPairBytes) {
      if (block + kPrefetchBytes < stream_end) _mm_prefetch(block + kPrefetchBytes, _MM_HINT_T1);
      const int64_t p = g * pairs_per_group + pp;
      const __m256 e = _mm256_broadcast_ss(x + 2 * p), o = _mm256_broadcast_ss(x + 2 * p + 1);
      __m256 even[8], odd[8];
      Format::widen(block, even, odd);
      for (int a = 0; a < 8; ++a) s[a] = _mm256_fmadd_ps(o, odd[a], _mm256_fmadd_ps(e, even[a], s[a]));
    }
    f.load(scale + g * kBlockCols, minimum ? minimum + g * kBlockCols : nullptr);
    for (int a = 0; a < 8; ++a) {
      const __m256 total = _mm256_loadu_ps(totals + 8 * a);
      _mm256_storeu_ps(totals + 8 * a, fold<Format>(total, s[a], f.d + 8 * a, f.m + 8 * a, x_sum ? x_sum[g] : 0.0f));
    }
  }
}

// One group of a block (G / 2 k-pairs) widened to float32: scratch[pp][0 even, 1 odd][64 columns].
template <class Format>
void widen_group(const char* group, int64_t pairs, float* scratch) {
  for (int64_t pp = 0; pp < pairs; ++pp, group += Format::kPairBytes, scratch += 2 * kBlockCols) {
    __m256 even[8], odd[8];
    Format::widen(group, even, odd);
    for (int a = 0; a < 8; ++a) {
      _mm256_storeu_ps(scratch + 8 * a, even[a]);
      _mm256_storeu_ps(scratch + kBlockCols + 8 * a, odd[a]);
    }
  }
}

// kRows rows (float32, stride K, already offset to the group) against 16 columns of a widened
// group -> out (kRows x 16), the same FMA chain per column as dot_block_row's. 2 x kRows
// accumulators, 2 weight vectors and a broadcast fit AVX2's 16 registers, and each loaded weight
// vector serves every row.
// The accumulators are named scalars, not an array, so that GCC keeps them in registers (an
// array of __m256 goes through the stack on every k-pair; see bf16_avx2_block.h).
#define NANOSERVE_ROW_SUMS(r) __m256 s##r##0 = _mm256_setzero_ps(), s##r##1 = s##r##0;
#define NANOSERVE_ROW_FMA(r, offset, w0, w1)                                                         \
  if constexpr (kRows > r) {                                                                         \
    const __m256 b = _mm256_broadcast_ss(x + r * K + 2 * pp + offset);                               \
    s##r##0 = _mm256_fmadd_ps(b, w0, s##r##0);                                                       \
    s##r##1 = _mm256_fmadd_ps(b, w1, s##r##1);                                                       \
  }
#define NANOSERVE_ROW_OUT(r) \
  if constexpr (kRows > r) _mm256_storeu_ps(out + 16 * r, s##r##0), _mm256_storeu_ps(out + 16 * r + 8, s##r##1);

template <int kRows>
void dot_group_columns(const float* x, int64_t K, const float* scratch, int64_t pairs, float* out) {
  static_assert(kRows >= 1 && kRows <= kTileRows);
  NANOSERVE_ROW_SUMS(0) NANOSERVE_ROW_SUMS(1) NANOSERVE_ROW_SUMS(2)
  NANOSERVE_ROW_SUMS(3) NANOSERVE_ROW_SUMS(4) NANOSERVE_ROW_SUMS(5)
  for (int64_t pp = 0; pp < pairs; ++pp, scratch += 2 * kBlockCols) {
    const __m256 even0 = _mm256_loadu_ps(scratch), even1 = _mm256_loadu_ps(scratch + 8);
    NANOSERVE_ROW_FMA(0, 0, even0, even1) NANOSERVE_ROW_FMA(1, 0, even0, even1) NANOSERVE_ROW_FMA(2, 0, even0, even1)
    NANOSERVE_ROW_FMA(3, 0, even0, even1) NANOSERVE_ROW_FMA(4, 0, even0, even1) NANOSERVE_ROW_FMA(5, 0, even0, even1)
    const __m256 odd0 = _mm256_loadu_ps(scratch + kBlockCols), odd1 = _mm256_loadu_ps(scratch + kBlockCols + 8);
    NANOSERVE_ROW_FMA(0, 1, odd0, odd1) NANOSERVE_ROW_FMA(1, 1, odd0, odd1) NANOSERVE_ROW_FMA(2, 1, odd0, odd1)
    NANOSERVE_ROW_FMA(3, 1, odd0, odd1) NANOSERVE_ROW_FMA(4, 1, odd0, odd1) NANOSERVE_ROW_FMA(5, 1, odd0, odd1)
  }
  NANOSERVE_ROW_OUT(0) NANOSERVE_ROW_OUT(1) NANOSERVE_ROW_OUT(2) NANOSERVE_ROW_OUT(3) NANOSERVE_ROW_OUT(4)
  NANOSERVE_ROW_OUT(5)
}
#undef NANOSERVE_ROW_SUMS
#undef NANOSERVE_ROW_FMA
#undef NANOSERVE_ROW_OUT

using DotGroupColumns = void (*)(const float*, int64_t, const float*, int64_t, float*);
constexpr DotGroupColumns kDotGroupColumns[kTileRows + 1] = {
    nullptr, dot_group_columns<1>, dot_group_columns<2>, dot_group_columns<3>,
    dot_group_columns<4>, dot_group_columns<5>, dot_group_columns<6>};

// Rows [0, rows) (rows <= kChunkRows) against one block through the scratch. totals:
// [2 halves][kChunkRows][32] floats, what store_block reads per half.
template <class Format>
void dot_block_rows(const float* x, int64_t K, int64_t G, int rows, const char* block, const at::Half* scale,
                    const at::Half* minimum, const float* x_sum, float* scratch, float* totals) {
  const int64_t groups = K / G, pairs = G / 2;
  std::fill(totals, totals + 2 * kChunkRows * kHalfCols, 0.0f);
  GroupFactors<Format> f;
  alignas(32) float sums[kTileRows * 16];
  for (int64_t g = 0; g < groups; ++g) {
    widen_group<Format>(block + g * pairs * Format::kPairBytes, pairs, scratch);
    f.load(scale + g * kBlockCols, minimum ? minimum + g * kBlockCols : nullptr);
    for (int r0 = 0; r0 < rows; r0 += kTileRows) {
      const int tile = std::min(kTileRows, rows - r0);
      for (int64_t c0 = 0; c0 < kBlockCols; c0 += 16) {
        kDotGroupColumns[tile](x + r0 * K + g * G, K, scratch + c0, pairs, sums);
        const int64_t half = c0 / kHalfCols;
        for (int r = 0; r < tile; ++r) {
          float* row_totals = totals + (half * kChunkRows + r0 + r) * kHalfCols + c0 % kHalfCols;
          const float x_group_sum = x_sum ? x_sum[(r0 + r) * groups + g] : 0.0f;
          for (int q = 0; q < 2; ++q) {
            const __m256 s = _mm256_load_ps(sums + 16 * r + 8 * q);
            _mm256_storeu_ps(row_totals + 8 * q, fold<Format>(_mm256_loadu_ps(row_totals + 8 * q), s, f.d + c0 + 8 * q,
                                                              f.m + c0 + 8 * q, x_group_sum));
          }
        }
      }
    }
  }
}

const float* float32_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
  return bias->data_ptr<float>();
}

template <class Format>
torch::Tensor grouped_linear(const torch::Tensor& x, const char* w, const at::Half* scale, const at::Half* minimum,
                             const float* bias, int64_t N, int64_t G, int64_t activation, bool float_output) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / G;
  const int64_t n_blocks = (N + kBlockCols - 1) / kBlockCols;
  const int64_t block_bytes = K / 2 * Format::kPairBytes;
  torch::Tensor widened;
  const float* xp = widen_rows(x, widened);  // (M, K) float32: widened once, broadcast from L1
  // x_sum[m][g]: each row's sum over each group, for the minimum's term (4-bit only). -ffast-math
  // may vectorize the loop, but each sum's order depends only on G and the row's alignment
  // (rows are G floats apart), never on M: a row's sums do not depend on its batch.
  std::vector<float> x_sum(Format::kHasMinimum ? M * groups : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(x_sum.size()); ++i) {
    float sum = 0.0f;
    for (int64_t k = 0; k < G; ++k) sum += xp[i * G + k];
    x_sum[i] = sum;
  }
  const float* sums = Format::kHasMinimum ? x_sum.data() : nullptr;
  auto y = new_output(x, M, N, float_output);
  const OutRows yp = OutRows::of(y);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const char* stream_end = w + end * block_bytes;
    std::vector<float> buffers(M == 1 ? kBlockCols : 2 * kChunkRows * kHalfCols + G * kBlockCols);
    float* totals = buffers.data();  // then, past M == 1, the widened group
    for (int64_t jb = begin; jb < end; ++jb) {
      const char* block = w + jb * block_bytes;
      const at::Half* block_scale = scale + jb * groups * kBlockCols;
      const at::Half* block_minimum = minimum ? minimum + jb * groups * kBlockCols : nullptr;
      const int64_t n0 = jb * kBlockCols;
      if (M == 1) {
        dot_block_row<Format>(xp, K, G, block, block_scale, block_minimum, sums, stream_end, totals);
        for (int half = 0; half < 2 && n0 + half * kHalfCols < N; ++half)
          store_block(totals + half * kHalfCols, 1, nullptr, bias, activation, yp, N, n0 + half * kHalfCols, N);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
        const int rows = static_cast<int>(std::min(kChunkRows, M - m0));
        dot_block_rows<Format>(xp + m0 * K, K, G, rows, block, block_scale, block_minimum,
                               sums ? sums + m0 * groups : nullptr, totals + 2 * kChunkRows * kHalfCols, totals);
        for (int half = 0; half < 2 && n0 + half * kHalfCols < N; ++half)
          store_block(totals + half * kChunkRows * kHalfCols, rows, nullptr, bias, activation, yp + m0 * N, N,
                      n0 + half * kHalfCols, N);
      }
    }
  });
  return y;
}

void check_input(const torch::Tensor& x, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "contiguous bf16 (M, K) input");
  TORCH_CHECK(G > 0 && G % 2 == 0 && x.size(1) % G == 0, "K must be a multiple of the group size, itself even");
}

void check_scales(const torch::Tensor& t, int64_t n_blocks, int64_t groups) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.numel() == n_blocks * groups * kBlockCols,
              "float16 (blocks, groups, 64) scales and minimums");
}

}  // namespace

bool grouped_avx2_available() { return true; }

torch::Tensor int4_avx2_linear(torch::Tensor x, torch::Tensor nibbles, torch::Tensor scale, torch::Tensor minimum,
                               c10::optional<torch::Tensor> bias, int64_t N, int64_t group_size, int64_t activation,
                               bool float_output) {
  x = x.contiguous();
  check_input(x, group_size);
  const int64_t K = x.size(1), n_blocks = (N + kBlockCols - 1) / kBlockCols;
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.is_contiguous() && nibbles.numel() == n_blocks * kBlockCols * K / 2,
              "uint8 nibbles of (N padded to 64) x K weights");
  check_scales(scale, n_blocks, K / group_size);
  check_scales(minimum, n_blocks, K / group_size);
  return grouped_linear<Nibbles>(x, reinterpret_cast<const char*>(nibbles.data_ptr<uint8_t>()), scale.data_ptr<at::Half>(),
                                 minimum.data_ptr<at::Half>(), float32_bias(bias, N), N, group_size, activation, float_output);
}

torch::Tensor int8_group_avx2_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                                     c10::optional<torch::Tensor> bias, int64_t N, int64_t group_size, int64_t activation,
                                     bool float_output) {
  x = x.contiguous();
  check_input(x, group_size);
  const int64_t K = x.size(1), n_blocks = (N + kBlockCols - 1) / kBlockCols;
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.numel() == n_blocks * kBlockCols * K,
              "int8 weight of (N padded to 64) x K elements in 64-column blocks");
  check_scales(scale, n_blocks, K / group_size);
  return grouped_linear<Int8s>(x, reinterpret_cast<const char*>(qweight.data_ptr<int8_t>()), scale.data_ptr<at::Half>(),
                               nullptr, float32_bias(bias, N), N, group_size, activation, float_output);
}

#else  // built without AVX2 + FMA + F16C: the Python side keeps its PyTorch path

bool grouped_avx2_available() { return false; }

torch::Tensor int4_avx2_linear(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                               int64_t, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AVX2 + FMA + F16C support");
}

torch::Tensor int8_group_avx2_linear(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t,
                                     int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AVX2 + FMA + F16C support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_avx2_available", &grouped_avx2_available, "whether this build has the AVX2 + FMA + F16C path");
  m.def("int4_avx2_linear", &int4_avx2_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("nibbles"), py::arg("scale"), py::arg("minimum"), py::arg("bias"), py::arg("N"),
        py::arg("group_size"), py::arg("activation"), py::arg("float_output") = false,
        "y = act(x @ W^T + b) for group-wise 4-bit W = scale * v + min, nibbles in 64-column blocks of k-pairs");
  m.def("int8_group_avx2_linear", &int8_group_avx2_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("N"), py::arg("group_size"),
        py::arg("activation"), py::arg("float_output") = false,
        "y = act(x @ W^T + b) for grouped int8 W = scale * q (GGUF Q8_0), 64-column blocks of k-pairs");
}
