// Linear layers over 4-bit weights, group-wise: every G consecutive weights of an output channel
// (G = 32, 64 or 128 along K) share a scale d and a minimum m, and w = d * v + m with v in 0..15
// (GGUF's Q4_1; Q4_0 is m = -8 d). A quarter of bf16's bytes, widened in registers for
// AVX512-BF16 dot products.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 (float32 with float_output) = x @ W^T + bias, optional GELU(tanh)
//   nibbles: 64-column blocks (N padded to 64) of k-pairs, 64 bytes a k-pair, read as 32 words.
//     Word i of k-pair p holds 4 nibbles; nibble j is the weight of column 16 j + i / 2 at
//     k = 2 p + i % 2. So (word >> 4 j) & 15 over the 32 words is lane-for-lane the B operand
//     of vdpbf16ps for columns 16 j .. 16 j + 15.
//   scale, minimum: (N / 64 blocks, K / G groups, 64 columns) fp16, as GGUF stores them (in
//   fp32 they would be a third of the bytes at G = 32).
//
//   Widening is bit work: (v & 15) | 0x4300 is the bf16 of 128 + v, exact. So the dot products
//   sum x (128 + v) =: dot; with s = the row's sum of x over the group,
//       sum x w = d sum x v + m s = d (dot - 128 s) + m s.
//   One load, three shifts and four ternary-logic ops widen 128 weights (int8 takes 20
//   instructions for as many).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_dot_block.h"

using nanoserve::kCols;
using nanoserve::new_output;
using nanoserve::OutRows;

namespace {

constexpr int kRowTile = 3;  // 3 rows x (4 totals + 4 group sums) + 4 weight vectors + temporaries
constexpr int64_t kPrefetchBytes = 1024;

// Nibble j of each word -> bf16 of 128 + nibble (0xEA is the ternary-logic table of (a & b) | c).
inline __m512bh widen(__m512i words, int j) {
  const __m512i shifted = j == 0 ? words : _mm512_srli_epi16(words, 4 * j);
  return (__m512bh)_mm512_ternarylogic_epi32(shifted, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4300), 0xEA);
}

// Rows [0, kRows) of x times one block: per group, dot products into g*, then folded into the
// totals c with the group's scale and minimum (one value per column).
template <int kRows>
void dot_block(const at::BFloat16* x, int64_t K, int64_t G, const char* block, const at::Half* scale,
               const at::Half* minimum, const float* xsum, int64_t groups, const char* stream_end,
               __m512 (&acc)[kRowTile][4]) {
  static_assert(kRows >= 1 && kRows <= kRowTile);
  __m512 c[kRows][4];
  for (int r = 0; r < kRows; ++r) for (int q = 0; q < 4; ++q) c[r][q] = _mm512_setzero_ps();
  const int64_t pairs_per_group = G / 2;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s[kRows][4];
    for (int r = 0; r < kRows; ++r) for (int q = 0; q < 4; ++q) s[r][q] = _mm512_setzero_ps();
    for (int64_t pp = 0; pp < pairs_per_group; ++pp, block += 64) {
      if ((pp & 15) == 0 && block + kPrefetchBytes < stream_end) _mm_prefetch(block + kPrefetchBytes, _MM_HINT_T1);
      const __m512i words = _mm512_loadu_si512(block);
      const __m512bh w0 = widen(words, 0), w1 = widen(words, 1), w2 = widen(words, 2), w3 = widen(words, 3);
      const int64_t p = g * pairs_per_group + pp;
      for (int r = 0; r < kRows; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * K + 2 * p, sizeof(pair));
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        s[r][0] = _mm512_dpbf16_ps(s[r][0], a, w0);
        s[r][1] = _mm512_dpbf16_ps(s[r][1], a, w1);
        s[r][2] = _mm512_dpbf16_ps(s[r][2], a, w2);
        s[r][3] = _mm512_dpbf16_ps(s[r][3], a, w3);
      }
    }
    for (int q = 0; q < 4; ++q) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + g * kCols + 16 * q)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(minimum + g * kCols + 16 * q)));
      for (int r = 0; r < kRows; ++r) {
        const __m512 sum_x = _mm512_set1_ps(xsum[r * groups + g]);
        const __m512 dot = _mm512_fnmadd_ps(sum_x, _mm512_set1_ps(128.0f), s[r][q]);  // dot - 128 s
        c[r][q] = _mm512_fmadd_ps(dot, d, _mm512_fmadd_ps(m, sum_x, c[r][q]));
      }
    }
  }
  for (int r = 0; r < kRows; ++r) for (int q = 0; q < 4; ++q) acc[r][q] = c[r][q];
}

using DotBlock = void (*)(const at::BFloat16*, int64_t, int64_t, const char*, const at::Half*, const at::Half*,
                          const float*, int64_t, const char*, __m512 (&)[kRowTile][4]);
constexpr DotBlock kDotBlock[kRowTile + 1] = {nullptr, dot_block<1>, dot_block<2>, dot_block<3>};

}  // namespace

bool int4_linear_available() { return true; }

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor nibbles, torch::Tensor scale, torch::Tensor minimum,
                          c10::optional<torch::Tensor> bias, int64_t N, int64_t group_size, int64_t activation,
                          bool float_output) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = group_size;
  const int64_t n_blocks = (N + kCols - 1) / kCols, groups = K / G;
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "K must be a multiple of the group size, itself a multiple of 32");
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.is_contiguous() && nibbles.numel() == n_blocks * kCols * K / 2,
              "uint8 nibbles of (N padded to 64) x K weights");
  for (const auto& t : {scale, minimum}) {
    TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.numel() == n_blocks * groups * kCols,
                "float16 (blocks, groups, 64) scales and minimums");
  }
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
    bp = bias->data_ptr<float>();
  }
  // xsum[m][g]: each row's sum over each group of K, in float32 from the same bf16 values (a
  // plain loop: ATen ops here would cost more than a decode row's whole matmul).
  std::vector<float> xsum(M * groups);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * groups; ++i) {
    float sum = 0.0f;
    for (int64_t k = 0; k < G; ++k) sum += static_cast<float>(xp[i * G + k]);
    xsum[i] = sum;
  }
  auto y = new_output(x, M, N, float_output);
  const char* w = reinterpret_cast<const char*>(nibbles.data_ptr<uint8_t>());
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = minimum.data_ptr<at::Half>();
  const float* xs = xsum.data();
  const int64_t block_bytes = K * kCols / 2;
  const OutRows yp = OutRows::of(y);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const char* stream_end = w + end * block_bytes;
    __m512 acc[kRowTile][4];
    for (int64_t jb = begin; jb < end; ++jb) {
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - m0));
        kDotBlock[rows](xp + m0 * K, K, G, w + jb * block_bytes, sp + jb * groups * kCols, mp + jb * groups * kCols,
                        xs + m0 * groups, groups, stream_end, acc);
        nanoserve::store_block(acc, rows, nullptr, bp, activation, yp + m0 * N, N, jb * kCols, N);
      }
    }
  });
  return y;
}

#else  // built without AVX512-BF16: the Python side keeps its PyTorch path

bool int4_linear_available() { return false; }

torch::Tensor int4_linear(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                          int64_t, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AVX512-BF16 support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear_available", &int4_linear_available, "whether this build has the AVX512-BF16 path");
  m.def("int4_linear", &int4_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("nibbles"), py::arg("scale"), py::arg("minimum"), py::arg("bias"), py::arg("N"),
        py::arg("group_size"), py::arg("activation"), py::arg("float_output") = false,
        "y = act(x @ W^T + b) for group-wise 4-bit W = scale * v + min, nibbles in 64-column blocks of k-pairs");
}
