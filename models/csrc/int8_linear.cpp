// Linear layers over int8 weights (weight-only quantization, one fp32 scale per output
// channel, or one fp16 scale per group of K: GGUF's Q8_0), dequantized in registers: the int8 stream is half the bytes of bf16, and decode steps
// are bound by streaming the weights. Needs AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake and every
// AMX CPU); elsewhere the Python side keeps its PyTorch reference path.
//
//   x (M, K) bf16 row-major     y (M, N) bf16 (float32 with float_output)
//                               = (x @ Q^T) * scale + bias, optional GELU(tanh)
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
//
//   On CPUs with AMX tiles, layers with K a multiple of 32 multiply with TDPBF16PS instead, at
//   every row count (see int8_linear_amx): the widened k-pairs are AMX B-tile rows as they are.
//
// int8_group_linear: the same bytes with one fp16 scale d per group of G weights along K instead
// of one per channel (GGUF's Q8_0 at G = 32: w = d q), scale (N / 64 blocks, K / G groups, 64)
// like int4_linear.cpp's. Each group's products sum apart and fold into the totals with their
// own scale, so at most kGroupRowTile rows share a pass over the weights; with more rows each
// block is widened once into the L2 scratch and every row tile reads that.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "bf16_dot_block.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "amx_tiles.h"
#define NANOSERVE_INT8_AMX 1
#endif

using namespace nanoserve;

namespace {

constexpr int64_t kWidenRows = 2 * kRowTile;  // more rows than this widen each block once, into scratch

// One int8 block (K/2 k-pairs of 128 bytes) -> the same block in bf16 (256 bytes a k-pair).
void widen_block(const char* block, int64_t K, char* out) {
  for (int64_t i = 0; i < K * kCols; i += 32) {
    _mm512_storeu_si512(out + 2 * i, (__m512i)int8x32_to_bf16(block + i));
  }
}

constexpr int kGroupRowTile = 3;  // 3 rows x (4 totals + 4 group sums) + 4 weight vectors

// Rows [0, kRows) of x times one block of grouped int8 weights -> acc (scales applied). kWidened:
// the block was widened to bf16 once (widen_block) and is read from that L2 copy, which gives
// the same products in the same order: a row's result does not depend on the batch.
template <int kRows, bool kWidened>
void dot_block_grouped(const at::BFloat16* x, int64_t K, int64_t G, const char* block, const at::Half* scale,
                       int64_t groups, const char* stream_end, __m512 (&acc)[kRowTile][4]) {
  constexpr int64_t kPairBytes = kWidened ? 256 : 128;
  static_assert(kRows >= 1 && kRows <= kGroupRowTile);
  __m512 c[kRows][4];
  for (int r = 0; r < kRows; ++r) for (int q = 0; q < 4; ++q) c[r][q] = _mm512_setzero_ps();
  const int64_t pairs_per_group = G / 2;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s[kRows][4];
    for (int r = 0; r < kRows; ++r) for (int q = 0; q < 4; ++q) s[r][q] = _mm512_setzero_ps();
    for (int64_t pp = 0; pp < pairs_per_group; ++pp, block += kPairBytes) {
      __m512bh w0, w1, w2, w3;
      if constexpr (kWidened) {
        w0 = (__m512bh)_mm512_loadu_si512(block), w1 = (__m512bh)_mm512_loadu_si512(block + 64);
        w2 = (__m512bh)_mm512_loadu_si512(block + 128), w3 = (__m512bh)_mm512_loadu_si512(block + 192);
      } else {
        if (((g * pairs_per_group + pp) & 7) == 0 && block + kPrefetchBytes < stream_end) {
          _mm_prefetch(block + kPrefetchBytes, _MM_HINT_T1);  // one 1 KiB step of the stream at a time
        }
        w0 = int8x32_to_bf16(block), w1 = int8x32_to_bf16(block + 32);
        w2 = int8x32_to_bf16(block + 64), w3 = int8x32_to_bf16(block + 96);
      }
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
      for (int r = 0; r < kRows; ++r) c[r][q] = _mm512_fmadd_ps(s[r][q], d, c[r][q]);
    }
  }
  for (int r = 0; r < kRows; ++r) for (int q = 0; q < 4; ++q) acc[r][q] = c[r][q];
}

using GroupedDotBlock = void (*)(const at::BFloat16*, int64_t, int64_t, const char*, const at::Half*, int64_t,
                                 const char*, __m512 (&)[kRowTile][4]);
template <bool kWidened>
constexpr GroupedDotBlock kGroupedDotBlock[kGroupRowTile + 1] = {
    nullptr, dot_block_grouped<1, kWidened>, dot_block_grouped<2, kWidened>, dot_block_grouped<3, kWidened>};

#ifdef NANOSERVE_INT8_AMX
// AMX tiles for int8_linear on CPUs that have them, at every row count: the weights widen to bf16
// (the layout above, 256 bytes a k-pair) and multiply with TDPBF16PS. A widened k-pair row is
// four AMX B-tile rows side by side (16 columns of (k, k + 1) pairs, 64 bytes each), so a B tile
// is 16 k-pairs of one column quarter read with a 256-byte stride. Up to 16 rows widen 16
// k-pairs at a time into an L1 buffer; more rows widen each block once into an L2 scratch. Dot
// products (vdpbf16ps) run several times slower than tiles on such CPUs (GPT-2's bf16 head at 32
// rows: 13.4 ms against 2.0 ms), which made int8 weights lose to bf16 past one row. A row's
// products do not depend on the other rows of its tile, so a row gets the same bits alone or in
// any batch; x is zero-padded to whole 16-row tiles.
//   tiles: 0-3 accumulators (16 rows x 16 columns, one per column quarter), 4 x, 5-6 weights.

void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }  // C, A and B: 16 rows of 64 bytes
  _tile_loadconfig(&cfg);
}

// 16 rows of x (row stride K) times one block -> acc (16 rows x 64 fp32, row stride 64). kWidened:
// the block was widened whole (widen_block; several row tiles read it); else each 16 k-pairs of
// int8 widen into `chunk` (4 KiB, stays in L1) just before their tiles: the same bf16 values,
// the same tile products, so the same bits, without writing and re-reading the block through L2.
template <bool kWidened>
void amx_block(const at::BFloat16* x, int64_t K, const char* block, const char* stream_end, char* chunk, float* acc) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    const char* b = block + k0 / 2 * 256;  // 16 k-pairs from k-pair k0 / 2, widened
    if constexpr (!kWidened) {
      const char* q = block + k0 / 2 * 128;  // the same 16 k-pairs, int8: 2 KiB
      const char* ahead = q + kPrefetchBytes;
      if (ahead < stream_end)
        for (int64_t i = 0; i < 2048; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T1);
      for (int64_t i = 0; i < 2048; i += 32) _mm512_store_si512(chunk + 2 * i, (__m512i)int8x32_to_bf16(q + i));
      asm volatile("" ::: "memory");  // GCC's tile loads name no memory operand: keep the stores before them
      b = chunk;
    }
    _tile_loadd(4, x + k0, K * 2);
    _tile_loadd(5, b, 256);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 64, 256);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, b + 128, 256);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, b + 192, 256);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, acc, 256); _tile_stored(1, acc + 16, 256);
  _tile_stored(2, acc + 32, 256); _tile_stored(3, acc + 48, 256);
}

void int8_linear_amx(const torch::Tensor& x, const char* w, const float* sp, const float* bp, int64_t N,
                     int64_t activation, OutRows yp) {
  const int64_t M = x.size(0), K = x.size(1), n_blocks = (N + kCols - 1) / kCols;
  const int64_t padded_rows = (M + 15) / 16 * 16;
  const torch::Tensor xp16 = padded_rows == M ? x : at::constant_pad_nd(x, {0, 0, 0, padded_rows - M});
  const at::BFloat16* xp = xp16.data_ptr<at::BFloat16>();
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> widened(M > 16 ? K * kCols + 32 : 0);  // one block in bf16, per thread (+ room to align)
    char* scratch = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(widened.data()) + 63) & ~uintptr_t{63});
    alignas(64) char chunk[4096];  // 16 k-pairs in bf16, for a single row tile
    alignas(64) float tile_acc[16 * 64];
    __m512 acc[kRowTile][4];
    configure_tiles();
    const char* stream_end = w + end * K * kCols;
    for (int64_t jb = begin; jb < end; ++jb) {
      const char* block = w + jb * K * kCols;
      if (M > 16) {
        widen_block(block, K, scratch);
        asm volatile("" ::: "memory");  // as above: the scratch is read by tile loads only
      }
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        if (M > 16) amx_block<true>(xp + m0 * K, K, scratch, nullptr, nullptr, tile_acc);
        else amx_block<false>(xp + m0 * K, K, block, stream_end, chunk, tile_acc);
        const int tile_rows = static_cast<int>(std::min<int64_t>(16, M - m0));
        for (int r0 = 0; r0 < tile_rows; r0 += kRowTile) {  // the dot path's epilogue, kRowTile rows at a time
          const int rows = std::min(kRowTile, tile_rows - r0);
          for (int r = 0; r < rows; ++r)
            for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_load_ps(tile_acc + (r0 + r) * 64 + 16 * q);
          store_block(acc, rows, sp, bp, activation, yp + (m0 + r0) * N, N, jb * kCols, N);
        }
      }
    }
    _tile_release();
  });
}
#endif

bool int8_amx() {
#ifdef NANOSERVE_INT8_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// The optional float32 (N,) bias the epilogue adds, or nullptr.
const float* float32_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "float32 (N,) bias");
  return bias->data_ptr<float>();
}

}  // namespace

bool int8_linear_available() { return true; }

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                          c10::optional<torch::Tensor> bias, int64_t N, int64_t activation, bool float_output) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t n_blocks = (N + kCols - 1) / kCols;
  TORCH_CHECK(K % 2 == 0, "K must be even");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.numel() == n_blocks * kCols * K,
              "int8 weight of (N padded to 64) x K elements in 64-column blocks");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N, "float32 (N,) scale");
  const float* bp = float32_bias(bias, N);
  auto y = new_output(x, M, N, float_output);
  const char* w = reinterpret_cast<const char*>(qweight.data_ptr<int8_t>());
  const float* sp = scale.data_ptr<float>();
#ifdef NANOSERVE_INT8_AMX
  if (K % 32 == 0 && int8_amx()) {
    int8_linear_amx(x, w, sp, bp, N, activation, OutRows::of(y));
    return y;
  }
#endif
  const int64_t block_bytes = K * kCols;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const OutRows yp = OutRows::of(y);
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

torch::Tensor int8_group_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                                c10::optional<torch::Tensor> bias, int64_t N, int64_t group_size, int64_t activation,
                                bool float_output) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 (M, K) input");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = group_size;
  TORCH_CHECK(G > 0 && G % 2 == 0 && K % G == 0, "K must be a multiple of the group size, itself even");
  const int64_t n_blocks = (N + kCols - 1) / kCols, groups = K / G;
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.numel() == n_blocks * kCols * K,
              "int8 weight of (N padded to 64) x K elements in 64-column blocks");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == n_blocks * groups * kCols,
              "float16 (blocks, groups, 64) scales");
  const float* bp = float32_bias(bias, N);
  auto y = new_output(x, M, N, float_output);
  const char* w = reinterpret_cast<const char*>(qweight.data_ptr<int8_t>());
  const at::Half* sp = scale.data_ptr<at::Half>();
  const int64_t block_bytes = K * kCols;
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const OutRows yp = OutRows::of(y);
  const bool widen = M > kGroupRowTile;  // more than one row tile: widen each block once, not per tile
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    const char* stream_end = w + end * block_bytes;
    __m512 acc[kRowTile][4];
    std::vector<at::BFloat16> widened(widen ? K * kCols : 0);  // one block in bf16, per thread
    char* scratch = reinterpret_cast<char*>(widened.data());
    for (int64_t jb = begin; jb < end; ++jb) {
      if (widen) widen_block(w + jb * block_bytes, K, scratch);
      for (int64_t m0 = 0; m0 < M; m0 += kGroupRowTile) {
        const int rows = static_cast<int>(std::min<int64_t>(kGroupRowTile, M - m0));
        const at::Half* block_scale = sp + jb * groups * kCols;
        if (widen) {
          kGroupedDotBlock<true>[rows](xp + m0 * K, K, G, scratch, block_scale, groups, nullptr, acc);
        } else {
          kGroupedDotBlock<false>[rows](xp + m0 * K, K, G, w + jb * block_bytes, block_scale, groups, stream_end, acc);
        }
        store_block(acc, rows, nullptr, bp, activation, yp + m0 * N, N, jb * kCols, N);
      }
    }
  });
  return y;
}

#else  // built without AVX512-BF16: the Python side keeps its PyTorch path

bool int8_linear_available() { return false; }

bool int8_amx() { return false; }

torch::Tensor int8_linear(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AVX512-BF16 support");
}

torch::Tensor int8_group_linear(torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t,
                                int64_t, int64_t, bool) {
  TORCH_CHECK(false, "built without AVX512-BF16 support");
}

#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear_available", &int8_linear_available, "whether this build has the AVX512-BF16 path");
  m.def("int8_amx", &int8_amx, "whether int8_linear multiplies with AMX tiles here (layers with K a multiple of 32)");
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("N"), py::arg("activation"),
        py::arg("float_output") = false,
        "y = act((x @ Q^T) * scale + b) for an int8 weight in 64-column blocks of k-pairs");
  m.def("int8_group_linear", &int8_group_linear, py::call_guard<py::gil_scoped_release>(),
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias"), py::arg("N"), py::arg("group_size"),
        py::arg("activation"), py::arg("float_output") = false,
        "y = act(x @ W^T + b) for W = scale * Q, one scale per group of K (GGUF Q8_0), same layout");
}
