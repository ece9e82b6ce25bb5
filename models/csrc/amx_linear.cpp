// Small-batch bf16 linear layers on Intel AMX, reading the weight oneDNN already packed (its
// opaque tensor's buffer, passed as address and size; the caller keeps that tensor alive).
//
// A decode step multiplies a few rows of activations (M <= 32) by every weight once, so it is
// bound by streaming the weights from memory. oneDNN's brgemm reaches ~8 GB/s at M = 32 on a
// 2-core VM whose cores can read ~20 GB/s; this kernel walks each thread's share of the weight
// as one contiguous stream, prefetching ahead, with the activations resident in L1/L2.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 (float32 with float_output) = x @ W^T + bias, optional GELU(tanh)
//   W packed by oneDNN as AB16b32a2b: 32x32 blocks (N padded with zeros to a multiple of 32),
//   N-block major, K blocks contiguous inside:
//     W[n][k] at ((n / 32) * (K / 32) + k / 32) * 1024 + ((k % 32) / 2) * 64 + (n % 32) * 2 + k % 2
//   One 2 KiB block holds two AMX B tiles (16 K-pairs x 16 columns) side by side, row stride
//   128 bytes. Tiles: 0-3 accumulators C[m-half][n-half], 4-5 rows of x, 6-7 the two B tiles.
//   The Python side checks the packed layout against this formula before using the kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include "amx_tiles.h"
#include "avx512_math.h"
#include "linear_output.h"

namespace {

using nanoserve::OutRows;

constexpr int64_t kBlock = 32;              // N and K block of the packed layout
constexpr int64_t kBlockBytes = 32 * 32 * 2;
// How far ahead of the tiles the stream is fetched, into L2: 32 KiB ahead read ~25 GB/s cold in
// isolation vs ~22 GB/s for 8 KiB into L1 (no difference measurable inside a whole decode step).
constexpr int64_t kPrefetchBytes = 16 * kBlockBytes;

enum Activation : int64_t { kNone = 0, kGeluTanh = 1 };

using nanoserve::TileConfig;

void configure_tiles(int rows_lo, int rows_hi) {
  TileConfig cfg;
  const int rows[4] = {rows_lo, rows_lo, rows_hi, rows_hi};
  for (int t = 0; t < 4; ++t) { cfg.rows[t] = rows[t]; cfg.colsb[t] = 64; }          // C: rows x 16 fp32
  cfg.rows[4] = rows_lo; cfg.colsb[4] = 64;                                             // A: rows x 32 bf16
  cfg.rows[5] = rows_hi; cfg.colsb[5] = 64;
  for (int t = 6; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }                  // B: 16 pairs x 16 cols
  _tile_loadconfig(&cfg);
}

// acc (rows x 32 fp32, row stride 32) + bias -> activation -> columns [n0, n0 + 32) of y (bf16 or float32).
void store_block(const float* acc, int rows, const float* bias, int64_t activation, OutRows y, int64_t ldy,
                 int64_t n0, int64_t n_total) {
  for (int half = 0; half < 2; ++half) {
    const int64_t col = n0 + 16 * half;
    if (col >= n_total) break;
    const __mmask16 mask = static_cast<__mmask16>(n_total - col >= 16 ? 0xFFFF : (1u << (n_total - col)) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps();
    for (int m = 0; m < rows; ++m) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + m * 32 + 16 * half), b);
      if (activation == kGeluTanh) v = gelu_tanh(v);
      if (y.f32) _mm512_mask_storeu_ps(y.floats() + m * ldy + col, mask, v);
      else _mm256_mask_storeu_epi16(y.bf16() + m * ldy + col, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// Rows [0, rows) of x times N-blocks [jb_begin, jb_end) of the packed weight.
template <bool kTwoRowTiles>
void run_blocks(const at::BFloat16* x, int rows, int64_t K, const at::BFloat16* w, int64_t jb_begin, int64_t jb_end,
                const float* bias, int64_t activation, OutRows y, int64_t N) {
  const int64_t k_blocks = K / kBlock, ldx = K * 2;
  alignas(64) float acc[32 * 32];
  for (int64_t jb = jb_begin; jb < jb_end; ++jb) {
    const char* block = reinterpret_cast<const char*>(w) + jb * k_blocks * kBlockBytes;
    const char* stream_end = reinterpret_cast<const char*>(w) + jb_end * k_blocks * kBlockBytes;
    _tile_zero(0); _tile_zero(1);
    if constexpr (kTwoRowTiles) { _tile_zero(2); _tile_zero(3); }
    for (int64_t kb = 0; kb < k_blocks; ++kb, block += kBlockBytes) {
      const char* ahead = block + kPrefetchBytes;
      if (ahead < stream_end)
        for (int64_t b = 0; b < kBlockBytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
      const at::BFloat16* xk = x + kb * kBlock;
      _tile_loadd(4, xk, ldx);
      if constexpr (kTwoRowTiles) _tile_loadd(5, xk + 16 * K, ldx);
      _tile_loadd(6, block, 128);
      _tile_loadd(7, block + 64, 128);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (kTwoRowTiles) { _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); }
    }
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    if constexpr (kTwoRowTiles) { _tile_stored(2, acc + 16 * 32, 128); _tile_stored(3, acc + 16 * 32 + 16, 128); }
    store_block(acc, rows, bias, activation, y, N, jb * kBlock, N);
  }
}

}  // namespace

bool amx_available() { return nanoserve::amx_permitted(); }

torch::Tensor amx_linear(torch::Tensor x, int64_t weight_address, int64_t weight_nbytes, c10::optional<torch::Tensor> bias,
                         int64_t N, int64_t activation, bool float_output) {
  TORCH_CHECK(amx_available(), "AMX is not usable in this process");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t n_blocks = (N + kBlock - 1) / kBlock;  // oneDNN pads N to whole blocks
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(weight_address != 0 && weight_nbytes >= n_blocks * kBlock * K * 2, "packed weight too small for (N, K)");
  const float* bp = nullptr;  // float32, converted once by the caller
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
    bp = bias->data_ptr<float>();
  }
  auto y = nanoserve::new_output(x, M, N, float_output);
  const auto* w = reinterpret_cast<const at::BFloat16*>(weight_address);
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const int rows = static_cast<int>(std::min<int64_t>(32, M - m0));
    const at::BFloat16* xm = x.data_ptr<at::BFloat16>() + m0 * K;
    const OutRows ym = OutRows::of(y) + m0 * N;
    at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
      configure_tiles(std::min(rows, 16), std::max(rows - 16, 1));
      if (rows > 16) run_blocks<true>(xm, rows, K, w, begin, end, bp, activation, ym, N);
      else run_blocks<false>(xm, rows, K, w, begin, end, bp, activation, ym, N);
      _tile_release();
    });
  }
  return y;
}

#else  // built without AMX: the Python side keeps oneDNN

bool amx_available() { return false; }

torch::Tensor amx_linear(torch::Tensor, int64_t, int64_t, c10::optional<torch::Tensor>, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AMX support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_available", &amx_available, "whether this build and process can run AMX tiles");
  m.def("amx_linear", &amx_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("weight_address"), py::arg("weight_nbytes"), py::arg("bias"), py::arg("N"),
        py::arg("activation"), py::arg("float_output") = false, "y = act(x @ W^T + b) for a oneDNN-packed (AB16b32a2b) bf16 weight");
}
