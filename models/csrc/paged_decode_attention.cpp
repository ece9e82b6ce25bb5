// Paged decode attention for CPU: one query per sequence, keys and values read in place from
// the block pool through the block table, no gather.
//
//   q (S, H, D)   k_pool, v_pool (NB, BS, KVH, W)   block_tables (S, MB)   seq_lens (S,)
//   q's heads are packed; its rows may sit apart (read in place out of a fused QKV output)
//   token p of sequence s lives at k_pool[block_tables[s][p / BS]][p % BS][:][:]
//
// A pool has q's dtype (W = D), or is int8 (W = D + 4: D values, then the row's float32 scale,
// models/kv_int8.py); int8 rows are widened and scaled to float32 as they are read.
//
// Three implementations of the same math, all accumulation in float32:
// - AVX-512 (D a power of two, 16 to 256): one task per sequence (or per (sequence, slice of
//   adjacent KV heads) when the batch is shorter than two sequences a thread), a single pass over
//   the cache with an online softmax (flash-decoding style), 16 tokens at a time. Blocks are the
//   outer loop and heads the inner one, so each block's rows are read as one contiguous stretch,
//   and the blocks ahead are prefetched into L2, a head at a time while the current one is scored,
//   because blocks are scattered and hardware prefetchers stop at block edges. Decode attention is
//   bound by reading the cache, so that is what it optimizes. A store kernel quantizes new rows
//   into an int8 pool.
// - AVX2 + FMA (D a power of two, 16 to 256), for CPUs without AVX-512: the same walk and online
//   softmax, 16 tokens at a time on 8-lane vectors.
// - Portable: one task per sequence, three passes (scores, softmax, weighted values).
// `paged_decode_attention(..., path)` takes the best path built here that serves D, or a named
// one (and what follows it), so the tests run every path this CPU can.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

// Widen n values to float32. bf16 is the top half of a float32: a shift the compiler
// vectorizes (c10::BFloat16's own conversion does not).
template <typename T>
static inline void to_float(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const uint16_t* __restrict__ bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* __restrict__ out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

struct Shape {
  int64_t H, KVH, D, BS;
  float scale;
  int64_t W;      // pool elements per (token, KV head) row: D, or D + 4 for int8 rows
  int64_t q_row;  // elements between two sequences' queries: H * D, or more in a fused QKV output
};

// One token's rows for every KV head (KVH, W) -> float32 (KVH, D).
template <typename P>
static inline void widen_token(const P* src, float* dst, const Shape& sh) { to_float(src, dst, sh.KVH * sh.D); }
template <>
inline void widen_token<int8_t>(const int8_t* src, float* dst, const Shape& sh) {
  for (int64_t h = 0; h < sh.KVH; ++h) {
    const int8_t* r = src + h * sh.W;
    float scale;
    std::memcpy(&scale, r + sh.D, sizeof(float));
    for (int64_t d = 0; d < sh.D; ++d) dst[h * sh.D + d] = static_cast<float>(r[d]) * scale;
  }
}

template <typename T, typename P>
static void decode_sequence(const T* q, const P* k_pool, const P* v_pool, const int64_t* table, int64_t len,
                            T* out, const Shape& sh, std::vector<float>& buf) {
  const int64_t H = sh.H, D = sh.D, G = sh.H / sh.KVH, row_len = sh.KVH * sh.D;
  buf.resize(H * D + row_len + H * len + H * D);
  float* qf = buf.data();            // (H, D) scaled queries
  float* row = qf + H * D;           // (KVH, D) one token's keys or values
  float* scores = row + row_len;     // (H, len)
  float* acc = scores + H * len;     // (H, D)
  to_float(q, qf, H * D);
  for (int64_t i = 0; i < H * D; ++i) qf[i] *= sh.scale;
  auto token_row = [&](const P* pool, int64_t p) { return pool + (table[p / sh.BS] * sh.BS + p % sh.BS) * sh.KVH * sh.W; };
  // pass 1: scores[h][p] = q_h . k_p[h / G]
  for (int64_t p = 0; p < len; ++p) {
    widen_token(token_row(k_pool, p), row, sh);
    for (int64_t h = 0; h < H; ++h) {
      const float* __restrict__ qh = qf + h * D;
      const float* __restrict__ kh = row + (h / G) * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qh[d] * kh[d];
      scores[h * len + p] = dot;
    }
  }
  // pass 2: softmax per head; the 1/sum is applied at the end
  std::vector<float> inv_sum(H);
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores + h * len;
    float max_score = s[0];
    for (int64_t p = 1; p < len; ++p) max_score = std::max(max_score, s[p]);
    float sum = 0.0f;
    for (int64_t p = 0; p < len; ++p) {
      s[p] = std::exp(s[p] - max_score);
      sum += s[p];
    }
    inv_sum[h] = 1.0f / sum;
  }
  // pass 3: acc[h] = sum_p softmax[h][p] * v_p[h / G]
  std::fill(acc, acc + H * D, 0.0f);
  for (int64_t p = 0; p < len; ++p) {
    widen_token(token_row(v_pool, p), row, sh);
    for (int64_t h = 0; h < H; ++h) {
      const float w = scores[h * len + p];
      const float* __restrict__ vh = row + (h / G) * D;
      float* __restrict__ a = acc + h * D;
      for (int64_t d = 0; d < D; ++d) a[d] += w * vh[d];
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<T>(acc[h * D + d] * inv_sum[h]);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define NANOSERVE_HAS_SIMD 1

// The float32 scale stored after an int8 row's D values (1 for rows of other dtypes).
template <typename P>
static inline float row_scale(const P*, int64_t) { return 1.0f; }
static inline float row_scale(const int8_t* row, int64_t D) {
  float scale;
  std::memcpy(&scale, row + D, sizeof(float));
  return scale;
}

// Blocks in flight ahead of the one being read. Zen 3 (AVX2, whole blocks issued at once): 1 was
// ~8% slower, 4 no better; Zen 4 (AVX-512, a head at a time): 1, 2 and 3 measured alike.
constexpr int64_t kPrefetchBlocks = 2;

// Prefetches go to L2 (prefetcht1, __builtin_prefetch's locality 2 in GCC and Clang): a block's
// rows for every head overflow a 32 KB L1, and T0 read the cache from memory slower on a Zen 3
// (AVX2) and on a Zen 4 (AVX-512: 106 against 68 us for a GPT-2 layer at 330 tokens, one A/B).
constexpr int kIntoL2 = 2;

static inline void prefetch_rows(const char* first, int64_t rows, int64_t stride, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(first + r * stride + b, 0, kIntoL2);
    __builtin_prefetch(first + r * stride + bytes - 1, 0, kIntoL2);  // an unaligned span's last line
  }
}

// Online-softmax state of NQ query heads, in one 64-byte-aligned float buffer:
// queries (NQ, D) pre-scaled, accumulators (NQ, D), running max (NQ), running sum (NQ).
struct HeadStates {
  float *queries, *accs, *running_max, *running_sum;
  HeadStates(std::vector<float>& buf, int64_t NQ, int64_t D) {
    buf.resize(2 * NQ * D + 2 * NQ + 16);
    float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    queries = base, accs = base + NQ * D, running_max = accs + NQ * D, running_sum = running_max + NQ;
  }
};

// Work items of a decode batch: (sequence, slice of the KV heads); whole sequences when there
// are at least two per thread, else slices of adjacent KV heads, about two per thread (a short
// batch still spreads over every thread, and each walk reads its heads' rows of a token as one
// span: one head a walk read GPT-2's batch-1 cache at 60-70% of the speed, from memory).
// fn(q, table, len, h0, h1, out, buf) serves KV heads [h0, h1) of one sequence.
template <typename T, typename Fn>
static void for_each_item(const T* q, const int64_t* tables, const int64_t* lens, int64_t S, int64_t MB, T* out,
                          const Shape& sh, Fn fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t slices = S >= 2 * threads ? 1 : std::min<int64_t>(sh.KVH, (2 * threads + S - 1) / S);
  at::parallel_for(0, S * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / slices, slice = item % slices;
      TORCH_CHECK(lens[s] >= 1 && lens[s] <= MB * sh.BS, "sequence length outside its block table");
      const int64_t h0 = slice * sh.KVH / slices, h1 = (slice + 1) * sh.KVH / slices;
      fn(q + s * sh.q_row, tables + s * MB, lens[s], h0, h1, out + s * sh.H * sh.D, buf);
    }
  });
}

// The walk over KV heads [h0, h1) of one sequence: blocks outside and heads inside, so a block's
// rows (KVH heads side by side per token) are read as one contiguous stretch while they sit in
// cache. Blocks are scattered and hardware prefetchers stop at their edges, so the walk keeps
// kPrefetchBlocks blocks ahead in flight into L2, issuing each block's prefetches one head at a
// time between the heads of the block being read. Issued whole (~800 prefetches for a bf16 block
// when one walk covers GPT-2's 12 heads, as at 32 sequences), a layer at 32 x 512 tokens took
// 3.6 ms against 2.7 ms on a Zen 4. chunk(at, n, h) attends n <= 16 tokens
// of KV head h, token 0 at pool offset `at`, consecutive tokens KVH * W elements apart.
template <typename P, typename Chunk>
static inline void walk_blocks(const P* k_pool, const P* v_pool, const int64_t* table, int64_t len, int64_t h0, int64_t h1,
                               const Shape& sh, Chunk chunk) {
  const int64_t row = sh.KVH * sh.W;  // elements between consecutive tokens of a block
  const int64_t span_bytes = (h1 - h0) * sh.W * static_cast<int64_t>(sizeof(P));  // heads h0..h1 of one token
  const int64_t num_blocks = (len + sh.BS - 1) / sh.BS;
  const int64_t head_bytes = sh.W * static_cast<int64_t>(sizeof(P));
  for (int64_t ahead = 1; ahead < kPrefetchBlocks && ahead < num_blocks; ++ahead) {  // blocks 1 .. kPrefetchBlocks - 1
    const int64_t next = table[ahead] * sh.BS * row + h0 * sh.W;
    const int64_t rows = std::min(sh.BS, len - ahead * sh.BS);
    prefetch_rows(reinterpret_cast<const char*>(k_pool + next), rows, row * sizeof(P), span_bytes);
    prefetch_rows(reinterpret_cast<const char*>(v_pool + next), rows, row * sizeof(P), span_bytes);
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t block = table[b] * sh.BS * row;  // token 0 of block b
    const int64_t in_block = std::min(sh.BS, len - b * sh.BS);
    // block b + kPrefetchBlocks is fetched one head at a time, before each head of block b is read
    const bool fetch = b + kPrefetchBlocks < num_blocks;
    const int64_t next = fetch ? table[b + kPrefetchBlocks] * sh.BS * row : 0;
    const int64_t next_rows = fetch ? std::min(sh.BS, len - (b + kPrefetchBlocks) * sh.BS) : 0;
    for (int64_t h = h0; h < h1; ++h) {
      if (fetch) {
        prefetch_rows(reinterpret_cast<const char*>(k_pool + next + h * sh.W), next_rows, row * sizeof(P), head_bytes);
        prefetch_rows(reinterpret_cast<const char*>(v_pool + next + h * sh.W), next_rows, row * sizeof(P), head_bytes);
      }
      for (int64_t c = 0; c < in_block; c += 16)
        chunk(block + c * row + h * sh.W, static_cast<int>(std::min<int64_t>(16, in_block - c)), h);
    }
  }
}

// ---- AVX2 + FMA: the single-pass path for CPUs without AVX-512 ------------------------------
//
// attend_chunk's algorithm on 8 lanes, 16 tokens a chunk (so the softmax bookkeeping is paid
// once per 16 tokens, as on AVX-512). A head's D values are read 16 at a time into two float32
// vectors. For bf16 those are the even and the odd elements (a shift and a mask of one 256-bit
// load, no shuffle: the cache read is the hot loop); queries and accumulators are kept in the
// same lane order, and the output is written back in element order.

#include "avx2_math.h"

// 16 values of the pool's dtype as two float32 vectors, in the lane order of element_at.
static inline void load_pair(const c10::BFloat16* p, __m256& a, __m256& b) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));                                 // elements 0, 2, .. 14
  b = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(0xFFFF0000u)));      // elements 1, 3, .. 15
}
static inline void load_pair(const float* p, __m256& a, __m256& b) { a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8); }
static inline void load_pair(const c10::Half* p, __m256& a, __m256& b) {
  a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}
static inline void load_pair(const int8_t* p, __m256& a, __m256& b) {  // unscaled: the caller applies the row's scale
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
}

// The element of a 16-value group that lane slot s (0-7: vector a, 8-15: vector b) holds.
template <typename P>
static constexpr int element_at(int s) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) return s < 8 ? 2 * s : 2 * (s - 8) + 1;
  else return s;
}

static inline float sum_of_lanes8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float max_of_lanes8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// s[t] = the sum of d[t]'s 8 lanes, for 8 vectors at once: 6 horizontal adds leave the sums of
// each vector's low and high 128-bit halves side by side; one cross-half add finishes them.
static inline __m256 sum_lanes8(const __m256* d) {
  const __m256 t01 = _mm256_hadd_ps(d[0], d[1]), t23 = _mm256_hadd_ps(d[2], d[3]);
  const __m256 t45 = _mm256_hadd_ps(d[4], d[5]), t67 = _mm256_hadd_ps(d[6], d[7]);
  const __m256 u0 = _mm256_hadd_ps(t01, t23), u1 = _mm256_hadd_ps(t45, t67);  // lanes 0-3: low halves of 4 tokens, 4-7: high
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static inline __m256 lanes_below(int n) {  // lane t all ones where t < n
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// One chunk of n <= 16 cached tokens of one KV head folded into the state of the G query heads
// that share it. NP = D / 16 groups of 16 values a head row. Loops run over the groups outside
// and 8 tokens inside, so the 8 dot vectors stay in AVX2's 16 registers.
template <typename P, int NP, bool kWiden>
static inline void attend_chunk_avx2(const P* keys, const P* values, int64_t row, int n, int64_t G, float* queries,
                                     float* accs, float* running_max, float* running_sum) {
  constexpr int D = 16 * NP;
  constexpr int kGroups = NP < 4 ? NP : 4;  // value groups accumulated at once: 8 vectors in registers
  constexpr bool kInt8 = std::is_same_v<P, int8_t>;
  alignas(32) float keys_f[kWiden ? 16 * D : 1], values_f[kWiden ? 16 * D : 1];  // (16, D) widened chunk, lane order
  alignas(32) float weights[16], k_scales[16] = {}, v_scales[16] = {};  // lanes past n stay 0 (their scores are masked)
  auto key = [&](int t, int j, __m256& a, __m256& b) {
    if constexpr (kWiden) a = _mm256_load_ps(keys_f + t * D + 16 * j), b = _mm256_load_ps(keys_f + t * D + 16 * j + 8);
    else load_pair(keys + t * row + 16 * j, a, b);
  };
  auto value = [&](int t, int j, __m256& a, __m256& b) {
    if constexpr (kWiden) a = _mm256_load_ps(values_f + t * D + 16 * j), b = _mm256_load_ps(values_f + t * D + 16 * j + 8);
    else load_pair(values + t * row + 16 * j, a, b);
  };
  if constexpr (kWiden) {
    for (int t = 0; t < n; ++t) {
      const __m256 k_scale = _mm256_set1_ps(row_scale(keys + t * row, D));
      const __m256 v_scale = _mm256_set1_ps(row_scale(values + t * row, D));
      for (int j = 0; j < NP; ++j) {
        __m256 ka, kb, va, vb;
        load_pair(keys + t * row + 16 * j, ka, kb);
        load_pair(values + t * row + 16 * j, va, vb);
        if constexpr (kInt8) ka = _mm256_mul_ps(ka, k_scale), kb = _mm256_mul_ps(kb, k_scale), va = _mm256_mul_ps(va, v_scale),
                             vb = _mm256_mul_ps(vb, v_scale);
        _mm256_store_ps(keys_f + t * D + 16 * j, ka), _mm256_store_ps(keys_f + t * D + 16 * j + 8, kb);
        _mm256_store_ps(values_f + t * D + 16 * j, va), _mm256_store_ps(values_f + t * D + 16 * j + 8, vb);
      }
    }
  } else if constexpr (kInt8) {
    for (int t = 0; t < n; ++t) k_scales[t] = row_scale(keys + t * row, D), v_scales[t] = row_scale(values + t * row, D);
  }
  // scores of tokens first .. first + count - 1 (count <= 8) against one query head; lanes past count hold 0
  auto scores8 = [&](const float* qh, int first, int count) {
    __m256 dots[8];
    for (int t = 0; t < 8; ++t) dots[t] = _mm256_setzero_ps();
    for (int j = 0; j < NP; ++j) {
      const __m256 qa = _mm256_load_ps(qh + 16 * j), qb = _mm256_load_ps(qh + 16 * j + 8);
      for (int t = 0; t < count; ++t) {
        __m256 ka, kb;
        key(first + t, j, ka, kb);
        dots[t] = _mm256_fmadd_ps(qb, kb, _mm256_fmadd_ps(qa, ka, dots[t]));
      }
    }
    return sum_lanes8(dots);
  };
  const __m256 valid_lo = lanes_below(n), valid_hi = lanes_below(n - 8);
  for (int64_t g = 0; g < G; ++g) {
    const float* qh = queries + g * D;
    __m256 lo = n >= 8 ? scores8(qh, 0, 8) : scores8(qh, 0, n);  // a constant count unrolls whole
    __m256 hi = n == 16 ? scores8(qh, 8, 8) : n > 8 ? scores8(qh, 8, n - 8) : _mm256_setzero_ps();
    if constexpr (kInt8 && !kWiden)
      lo = _mm256_mul_ps(lo, _mm256_load_ps(k_scales)), hi = _mm256_mul_ps(hi, _mm256_load_ps(k_scales + 8));
    lo = _mm256_blendv_ps(_mm256_set1_ps(-1e30f), lo, valid_lo);
    hi = _mm256_blendv_ps(_mm256_set1_ps(-1e30f), hi, valid_hi);
    const float new_max = std::max(running_max[g], max_of_lanes8(_mm256_max_ps(lo, hi)));
    const __m256 shift = _mm256_set1_ps(new_max);
    const __m256 probs_lo = _mm256_and_ps(valid_lo, exp8(_mm256_sub_ps(lo, shift)));
    const __m256 probs_hi = _mm256_and_ps(valid_hi, exp8(_mm256_sub_ps(hi, shift)));
    const float rescale = std::exp(running_max[g] - new_max);
    running_sum[g] = running_sum[g] * rescale + sum_of_lanes8(_mm256_add_ps(probs_lo, probs_hi));
    running_max[g] = new_max;
    if constexpr (kInt8 && !kWiden) {  // an int8 row's scale folds into its softmax weight
      _mm256_store_ps(weights, _mm256_mul_ps(probs_lo, _mm256_load_ps(v_scales)));
      _mm256_store_ps(weights + 8, _mm256_mul_ps(probs_hi, _mm256_load_ps(v_scales + 8)));
    } else {
      _mm256_store_ps(weights, probs_lo), _mm256_store_ps(weights + 8, probs_hi);
    }
    // acc = acc * rescale + sum_t w_t v_t, kGroups groups (2 kGroups independent FMA chains) at a time
    float* acc_g = accs + g * D;
    for (int j0 = 0; j0 < NP; j0 += kGroups) {
      __m256 acc[2 * kGroups];
      for (int i = 0; i < 2 * kGroups; ++i) acc[i] = _mm256_mul_ps(_mm256_load_ps(acc_g + 16 * j0 + 8 * i), _mm256_set1_ps(rescale));
      for (int t = 0; t < n; ++t) {
        const __m256 w = _mm256_set1_ps(weights[t]);
        for (int j = 0; j < kGroups; ++j) {
          __m256 va, vb;
          value(t, j0 + j, va, vb);
          acc[2 * j] = _mm256_fmadd_ps(w, va, acc[2 * j]), acc[2 * j + 1] = _mm256_fmadd_ps(w, vb, acc[2 * j + 1]);
        }
      }
      for (int i = 0; i < 2 * kGroups; ++i) _mm256_store_ps(acc_g + 16 * j0 + 8 * i, acc[i]);
    }
  }
}

// KV heads [h0, h1) of one sequence and the query heads that share them, over walk_blocks.
template <typename T, typename P, int NP, bool kWiden>
static void decode_heads_avx2(const T* q, const P* k_pool, const P* v_pool, const int64_t* table, int64_t len,
                              int64_t h0, int64_t h1, int64_t G, T* out, const Shape& sh, std::vector<float>& buf) {
  constexpr int D = 16 * NP;
  const int64_t row = sh.KVH * sh.W;  // elements between consecutive tokens of a block
  const int64_t NQ = (h1 - h0) * G;   // query heads served, adjacent in q from query head h0 * G
  HeadStates st(buf, NQ, D);
  for (int64_t j = 0; j < NQ; ++j) {  // queries scaled into the pool's lane order
    const T* qj = q + (h0 * G + j) * D;
    for (int s = 0; s < D; ++s) st.queries[j * D + s] = static_cast<float>(qj[s / 16 * 16 + element_at<P>(s % 16)]) * sh.scale;
    std::fill(st.accs + j * D, st.accs + (j + 1) * D, 0.0f);
    st.running_max[j] = -1e30f;
    st.running_sum[j] = 0.0f;
  }
  walk_blocks(k_pool, v_pool, table, len, h0, h1, sh, [&](int64_t at, int n, int64_t h) {
    const int64_t j = (h - h0) * G;
    attend_chunk_avx2<P, NP, kWiden>(k_pool + at, v_pool + at, row, n, G, st.queries + j * D, st.accs + j * D,
                                     st.running_max + j, st.running_sum + j);
  });
  for (int64_t j = 0; j < NQ; ++j) {
    const float inv = 1.0f / st.running_sum[j];
    T* oj = out + (h0 * G + j) * D;
    for (int s = 0; s < D; ++s) oj[s / 16 * 16 + element_at<P>(s % 16)] = static_cast<T>(st.accs[j * D + s] * inv);
  }
}

// The AVX2 path for head dims of 16 to 256 in powers of two (false: the caller falls back).
template <typename T, typename P>
static bool decode_all_avx2(const T* q, const P* k_pool, const P* v_pool, const int64_t* tables, const int64_t* lens,
                            int64_t S, int64_t MB, T* out, const Shape& sh) {
  const int64_t G = sh.H / sh.KVH;
  auto run = [&](auto heads) {
    for_each_item(q, tables, lens, S, MB, out, sh, [&](const T* qs, const int64_t* table, int64_t len, int64_t h0, int64_t h1,
                                                       T* os, std::vector<float>& buf) {
      heads(qs, k_pool, v_pool, table, len, h0, h1, G, os, sh, buf);
    });
  };
  const bool widen = G > 1;  // a GQA group widens each chunk once for its heads; a lone head reads the pool
  switch (sh.D) {
    case 16: widen ? run(decode_heads_avx2<T, P, 1, true>) : run(decode_heads_avx2<T, P, 1, false>); return true;
    case 32: widen ? run(decode_heads_avx2<T, P, 2, true>) : run(decode_heads_avx2<T, P, 2, false>); return true;
    case 64: widen ? run(decode_heads_avx2<T, P, 4, true>) : run(decode_heads_avx2<T, P, 4, false>); return true;
    case 128: widen ? run(decode_heads_avx2<T, P, 8, true>) : run(decode_heads_avx2<T, P, 8, false>); return true;
    case 256: widen ? run(decode_heads_avx2<T, P, 16, true>) : run(decode_heads_avx2<T, P, 16, false>); return true;
    default: return false;
  }
}

#endif  // AVX2 + FMA + F16C

#if defined(__AVX512F__) && defined(NANOSERVE_HAS_SIMD)

#include "avx512_math.h"

#define NANOSERVE_HAS_AVX512 1

// 16 values of the pool's dtype as float32 lanes.
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
static inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512 load16(const int8_t* p) {  // unscaled: the row's scale is applied by the caller
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// s[t] = the sum of d[t]'s 16 lanes, for 16 vectors at once: a transpose-and-add tree of 46
// instructions, where a horizontal reduction per vector costs about 8 each.
static inline __m512 sum_lanes16(const __m512* d) {
  __m512 e[8], f[4], g[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lanes 0-1 of e[i]: token 2i, 2-3: token 2i + 1
    e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], 0x44), _mm512_shuffle_f32x4(d[2 * i], d[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane k of f[i]: token 4i + k
    f[i] = _mm512_add_ps(_mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], 0x88), _mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane k of g[i]: tokens 8i + k and 8i + 4 + k, interleaved
    g[i] = _mm512_add_ps(_mm512_unpacklo_ps(f[2 * i], f[2 * i + 1]), _mm512_unpackhi_ps(f[2 * i], f[2 * i + 1]));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x44), _mm512_shuffle_ps(g[0], g[1], 0xEE));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  // s[4k + p] is token 4p + k
  return _mm512_permutexvar_ps(order, s);
}

// One chunk of n <= 16 cached tokens of one KV head (`keys`, `values`: token 0 of the chunk,
// consecutive tokens `row` elements apart) folded into the state of the G query heads that
// share it. kWiden: the chunk is widened to float32 once into L1 and read back by every head of
// the group (int8 rows scaled on the way); otherwise the one head reads the pool directly, and
// an int8 row's scales are applied to its score and its softmax weight instead of its values.
template <typename P, int NV, bool kWiden>
static inline void attend_chunk(const P* keys, const P* values, int64_t row, int n, int64_t G, float* queries,
                                float* accs, float* running_max, float* running_sum) {
  constexpr int D = 16 * NV;
  constexpr bool kInt8 = std::is_same_v<P, int8_t>;
  alignas(64) float keys_f[kWiden ? 16 * D : 1], values_f[kWiden ? 16 * D : 1];  // (16, D) widened chunk
  alignas(64) float weights[16], k_scales[16], v_scales[16];
  auto key = [&](int t, int i) { if constexpr (kWiden) return _mm512_load_ps(keys_f + t * D + 16 * i); else return load16(keys + t * row + 16 * i); };
  auto value = [&](int t, int i) { if constexpr (kWiden) return _mm512_load_ps(values_f + t * D + 16 * i); else return load16(values + t * row + 16 * i); };
  if constexpr (kWiden) {
    for (int t = 0; t < n; ++t) {
      const __m512 k_scale = _mm512_set1_ps(row_scale(keys + t * row, D));
      const __m512 v_scale = _mm512_set1_ps(row_scale(values + t * row, D));
      for (int i = 0; i < NV; ++i) {
        __m512 k = load16(keys + t * row + 16 * i), v = load16(values + t * row + 16 * i);
        if constexpr (kInt8) k = _mm512_mul_ps(k, k_scale), v = _mm512_mul_ps(v, v_scale);
        _mm512_store_ps(keys_f + t * D + 16 * i, k);
        _mm512_store_ps(values_f + t * D + 16 * i, v);
      }
    }
  } else if constexpr (kInt8) {
    for (int t = 0; t < n; ++t) k_scales[t] = row_scale(keys + t * row, D), v_scales[t] = row_scale(values + t * row, D);
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
  for (int64_t g = 0; g < G; ++g) {
    __m512 qv[NV], acc[NV];
    for (int i = 0; i < NV; ++i) qv[i] = _mm512_load_ps(queries + g * D + 16 * i);
    __m512 scores;
    if (NV <= 8 && n == 16) {  // a full chunk: 16 dot vectors, summed by one tree (NV <= 8: no spills)
      __m512 dots[16];
      for (int t = 0; t < 16; ++t) {
        dots[t] = _mm512_mul_ps(qv[0], key(t, 0));
        for (int i = 1; i < NV; ++i) dots[t] = _mm512_fmadd_ps(qv[i], key(t, i), dots[t]);
      }
      scores = sum_lanes16(dots);
      if constexpr (kInt8 && !kWiden) scores = _mm512_mul_ps(scores, _mm512_load_ps(k_scales));
    } else {
      for (int t = 0; t < n; ++t) {
        __m512 dot = _mm512_mul_ps(qv[0], key(t, 0));
        for (int i = 1; i < NV; ++i) dot = _mm512_fmadd_ps(qv[i], key(t, i), dot);
        weights[t] = _mm512_reduce_add_ps(dot);
        if constexpr (kInt8 && !kWiden) weights[t] *= k_scales[t];
      }
      scores = _mm512_mask_loadu_ps(_mm512_set1_ps(-1e30f), valid, weights);
    }
    const float new_max = std::max(running_max[g], _mm512_reduce_max_ps(scores));
    const __m512 probs = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(new_max))));
    const float rescale = std::exp(running_max[g] - new_max);
    running_sum[g] = running_sum[g] * rescale + _mm512_reduce_add_ps(probs);
    running_max[g] = new_max;
    _mm512_store_ps(weights, probs);
    for (int i = 0; i < NV; ++i) acc[i] = _mm512_mul_ps(_mm512_load_ps(accs + g * D + 16 * i), _mm512_set1_ps(rescale));
    for (int t = 0; t < n; ++t) {
      const __m512 w = _mm512_set1_ps(kInt8 && !kWiden ? weights[t] * v_scales[t] : weights[t]);
      for (int i = 0; i < NV; ++i) acc[i] = _mm512_fmadd_ps(w, value(t, i), acc[i]);
    }
    for (int i = 0; i < NV; ++i) _mm512_store_ps(accs + g * D + 16 * i, acc[i]);
  }
}

// KV heads [h0, h1) of one sequence and the query heads that share them, over walk_blocks.
// NV = D / 16 float32 vectors per head row. Decode attention is bound by reading the cache.
template <typename T, typename P, int NV, bool kWiden>
static void decode_heads_avx512(const T* q, const P* k_pool, const P* v_pool, const int64_t* table, int64_t len,
                                int64_t h0, int64_t h1, int64_t G, T* out, const Shape& sh, std::vector<float>& buf) {
  constexpr int D = 16 * NV;
  const int64_t row = sh.KVH * sh.W;  // elements between consecutive tokens of a block
  const int64_t NQ = (h1 - h0) * G;   // query heads served, adjacent in q from query head h0 * G
  HeadStates st(buf, NQ, D);
  for (int64_t j = 0; j < NQ; ++j) {
    for (int i = 0; i < NV; ++i) {
      _mm512_store_ps(st.queries + j * D + 16 * i, _mm512_mul_ps(load16(q + (h0 * G + j) * D + 16 * i), _mm512_set1_ps(sh.scale)));
      _mm512_store_ps(st.accs + j * D + 16 * i, _mm512_setzero_ps());
    }
    st.running_max[j] = -1e30f;
    st.running_sum[j] = 0.0f;
  }
  walk_blocks(k_pool, v_pool, table, len, h0, h1, sh, [&](int64_t at, int n, int64_t h) {
    const int64_t j = (h - h0) * G;
    attend_chunk<P, NV, kWiden>(k_pool + at, v_pool + at, row, n, G, st.queries + j * D, st.accs + j * D,
                                st.running_max + j, st.running_sum + j);
  });
  for (int64_t j = 0; j < NQ; ++j) {
    const float inv = 1.0f / st.running_sum[j];
    for (int d = 0; d < D; ++d) out[(h0 * G + j) * D + d] = static_cast<T>(st.accs[j * D + d] * inv);
  }
}

template <typename T, typename P>
static bool decode_all_avx512(const T* q, const P* k_pool, const P* v_pool, const int64_t* tables, const int64_t* lens,
                              int64_t S, int64_t MB, T* out, const Shape& sh) {
  const int64_t G = sh.H / sh.KVH;
  auto run = [&](auto heads) {
    for_each_item(q, tables, lens, S, MB, out, sh, [&](const T* qs, const int64_t* table, int64_t len, int64_t h0, int64_t h1,
                                                       T* os, std::vector<float>& buf) {
      heads(qs, k_pool, v_pool, table, len, h0, h1, G, os, sh, buf);
    });
  };
  // a GQA group widens each chunk once for its heads; a lone head reads the pool directly
  const bool widen = G > 1;
  switch (sh.D) {
    case 16: widen ? run(decode_heads_avx512<T, P, 1, true>) : run(decode_heads_avx512<T, P, 1, false>); return true;
    case 32: widen ? run(decode_heads_avx512<T, P, 2, true>) : run(decode_heads_avx512<T, P, 2, false>); return true;
    case 64: widen ? run(decode_heads_avx512<T, P, 4, true>) : run(decode_heads_avx512<T, P, 4, false>); return true;
    case 128: widen ? run(decode_heads_avx512<T, P, 8, true>) : run(decode_heads_avx512<T, P, 8, false>); return true;
    case 256: widen ? run(decode_heads_avx512<T, P, 16, true>) : run(decode_heads_avx512<T, P, 16, false>); return true;
    default: return false;
  }
}
#endif  // __AVX512F__

// The code paths, best first. A request for one takes the next that serves the head dim.
enum class Path { kAvx512 = 0, kAvx2 = 1, kPortable = 2 };
static const char* const kPathNames[] = {"avx512", "avx2", "portable"};

static bool power_of_two_between(int64_t D, int64_t lo, int64_t hi) { return D >= lo && D <= hi && (D & (D - 1)) == 0; }

// What runs for head dim D when `start` or a lesser path is asked for (q float32/bf16/fp16).
static Path path_for(int64_t D, Path start) {
#ifdef NANOSERVE_HAS_AVX512
  if (start <= Path::kAvx512 && power_of_two_between(D, 16, 256)) return Path::kAvx512;
#endif
#ifdef NANOSERVE_HAS_SIMD
  if (start <= Path::kAvx2 && power_of_two_between(D, 16, 256)) return Path::kAvx2;
#endif
  return Path::kPortable;
}

static Path parse_path(const std::string& name) {
  if (name == "best") return Path::kAvx512;
  for (int p = 0; p < 3; ++p)
    if (name == kPathNames[p]) return static_cast<Path>(p);
  TORCH_CHECK(false, "unknown decode path '", name, "' (best, avx512, avx2 or portable)");
}

template <typename T, typename P>
static void decode_all(const T* qp, const P* kp, const P* vp, const int64_t* tp, const int64_t* lp, int64_t S, int64_t MB,
                       T* op, const Shape& sh, Path path) {
  if constexpr (!std::is_same_v<T, double>) {  // the SIMD paths take float32, bf16 and fp16 queries
    switch (path_for(sh.D, path)) {
#ifdef NANOSERVE_HAS_AVX512
      case Path::kAvx512: if (decode_all_avx512<T, P>(qp, kp, vp, tp, lp, S, MB, op, sh)) return; break;
#endif
#ifdef NANOSERVE_HAS_SIMD
      case Path::kAvx2: if (decode_all_avx2<T, P>(qp, kp, vp, tp, lp, S, MB, op, sh)) return; break;
#endif
      default: break;
    }
  }
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t s = begin; s < end; ++s) {
      TORCH_CHECK(lp[s] >= 1 && lp[s] <= MB * sh.BS, "sequence length outside its block table");
      decode_sequence<T, P>(qp + s * sh.q_row, kp, vp, tp + s * MB, lp[s], op + s * sh.H * sh.D, sh, buf);
    }
  });
}

// A (N, heads, D) tensor whose rows may sit apart (a view of a fused QKV projection's output)
// but whose heads and values are packed, as the store and the walk read them; else a packed copy.
static torch::Tensor packed_rows(const torch::Tensor& x) {
  return x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) ? x : x.contiguous();
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale,
                                     const std::string& path) {
  const Path start = parse_path(path);
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous pools required");
  TORCH_CHECK(q.dim() == 3, "q must be (S, H, D)");
  TORCH_CHECK(q.is_cpu() && k_pool.is_cpu() && v_pool.is_cpu() && block_tables.is_cpu() && seq_lens.is_cpu(),
              "CPU tensors only");
  q = packed_rows(q);  // a view of the fused QKV output is read in place (its heads are packed)
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64, "int64 tables");
  const bool int8_pool = k_pool.scalar_type() == torch::kChar;
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() && (int8_pool || q.scalar_type() == k_pool.scalar_type()),
              "pools must have q's dtype or be int8");
  const int64_t S = q.size(0), MB = block_tables.size(1);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == S && seq_lens.dim() == 1 && seq_lens.size(0) == S,
              "block_tables (S, MB) and seq_lens (S,) for q's S sequences");
  const Shape sh{q.size(1), k_pool.size(2), q.size(2), k_pool.size(1), static_cast<float>(scale), k_pool.size(3),
                 q.stride(0)};
  TORCH_CHECK(sh.H % sh.KVH == 0 && sh.W == sh.D + (int8_pool ? 4 : 0), "shape mismatch");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty({S, sh.H, sh.D}, q.options());  // (S, H, D) packed
  if (S == 0) return out;  // nothing to attend (the work split divides by S)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const int64_t* tp = tables.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    if (int8_pool)
      decode_all(q.data_ptr<scalar_t>(), k_pool.data_ptr<int8_t>(), v_pool.data_ptr<int8_t>(), tp, lp, S, MB,
                 out.data_ptr<scalar_t>(), sh, start);
    else
      decode_all(q.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(), tp, lp, S, MB,
                 out.data_ptr<scalar_t>(), sh, start);
  });
  return out;
}

// New keys or values (N, KVH, D), token n's heads packed at rows + n * row_stride, quantized into
// an int8 pool viewed as (slots, KVH, D + 4), the same arithmetic as models/kv_int8.py's
// quantize_rows: scale = max(|x|max, 1e-12) * (1/127), q = clamp(round_half_even(x * (1/scale)),
// -127, 127), the scale's 4 bytes after the values. Inputs are finite (a model's keys and
// values); -ffast-math makes no promise about NaN or inf.
template <typename T>
static void store_int8_rows(const T* rows, int64_t row_stride, const int64_t* slots, int8_t* pool, int64_t N, int64_t KVH,
                            int64_t D) {
  const int64_t W = D + 4;
  at::parallel_for(0, N * KVH, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> x(D);
    for (int64_t i = begin; i < end; ++i) {
      to_float(rows + (i / KVH) * row_stride + (i % KVH) * D, x.data(), D);
      float amax = 0.0f;
      for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
      // each through a volatile, so -ffast-math cannot reassociate x * (1 / (m * c)) into
      // another rounding of the same quotient than the PyTorch path's
      volatile float scale_bits = std::max(amax, 1e-12f) * (1.0f / 127.0f);
      const float scale = scale_bits;
      volatile float inv_bits = 1.0f / scale;
      const float inv = inv_bits;
      int8_t* dst = pool + (slots[i / KVH] * KVH + i % KVH) * W;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(x[d] * inv), -127.0f, 127.0f));
      std::memcpy(dst + D, &scale, sizeof(float));
    }
  });
}

// One pool's new rows (token n's at rows + n * stride(0)): copied as they are into a pool of
// their dtype, quantized into an int8 one.
template <typename T>
static void store_pool_rows(const torch::Tensor& rows, const int64_t* slots, torch::Tensor& pool) {
  const int64_t N = rows.size(0), KVH = rows.size(1), D = rows.size(2);
  const T* src = rows.data_ptr<T>();
  const int64_t row_stride = rows.stride(0), width = KVH * D;
  if (pool.scalar_type() == torch::kChar) {
    store_int8_rows(src, row_stride, slots, pool.data_ptr<int8_t>(), N, KVH, D);
    return;
  }
  T* dst = pool.data_ptr<T>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) std::memcpy(dst + slots[n] * width, src + n * row_stride, width * sizeof(T));
  });
}

// New keys and values (N, KVH, D) written into both pools (NB, BS, KVH, W) at their slots, in one
// call: what models/attention.py's write_kv does with two index_copy_ (or int8 quantizing) ops.
void store_kv(torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor slot_mapping, torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(),
              "two contiguous (NB, BS, KVH, W) pools");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type() && k.scalar_type() == v.scalar_type(), "one dtype per pair");
  TORCH_CHECK(k_pool.scalar_type() == torch::kChar || k_pool.scalar_type() == k.scalar_type(), "pools of k's dtype, or int8");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1, "int64 slots");
  TORCH_CHECK(k_pool.is_cpu() && k.is_cpu() && v.is_cpu() && slot_mapping.is_cpu(), "CPU tensors only");
  const bool int8_pool = k_pool.scalar_type() == torch::kChar;
  auto keys = packed_rows(k), values = packed_rows(v);
  const int64_t N = keys.size(0), KVH = keys.size(1), D = keys.size(2);
  TORCH_CHECK(values.sizes() == keys.sizes() && slot_mapping.size(0) == N, "shape mismatch");
  TORCH_CHECK(k_pool.size(2) == KVH && k_pool.size(3) == D + (int8_pool ? 4 : 0), "rows do not fit the pool");
  auto slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_pool.size(0) * k_pool.size(1);
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(slot[n] >= 0 && slot[n] < num_slots, "slot outside the pool");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "store_kv", [&] {
    store_pool_rows<scalar_t>(keys, slot, k_pool);
    store_pool_rows<scalar_t>(values, slot, v_pool);
  });
}

// A decode-only step's attention in one call: store the new keys and values, then attend.
// q (S, H, D), k and v (S, KVH, D) -> (S, H, D).
torch::Tensor store_and_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_pool,
                               torch::Tensor v_pool, torch::Tensor slot_mapping, torch::Tensor block_tables,
                               torch::Tensor seq_lens, double scale) {
  store_kv(k_pool, v_pool, slot_mapping, k, v);
  return paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, scale, "best");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("store_kv", &store_kv, py::call_guard<py::gil_scoped_release>(),
        "write new K and V rows into their pools at their slots, quantized for int8 pools (CPU)");
  m.def("store_and_decode", &store_and_decode, py::call_guard<py::gil_scoped_release>(),
        "a decode-only step: store the new K/V rows, then paged decode attention (CPU)");
  m.def("paged_decode_attention", &paged_decode_attention, py::call_guard<py::gil_scoped_release>(),
        "paged decode attention (CPU); path: best, or a path of paths() and what follows it", py::arg("q"),
        py::arg("k_pool"), py::arg("v_pool"), py::arg("block_tables"), py::arg("seq_lens"), py::arg("scale"),
        py::arg("path") = "best");
  m.def("paths", [] {
    std::vector<std::string> built;
#ifdef NANOSERVE_HAS_AVX512
    built.push_back(kPathNames[static_cast<int>(Path::kAvx512)]);
#endif
#ifdef NANOSERVE_HAS_SIMD
    built.push_back(kPathNames[static_cast<int>(Path::kAvx2)]);
#endif
    built.push_back(kPathNames[static_cast<int>(Path::kPortable)]);
    return built;
  }, "the decode paths built here, best first");
  m.def("path_for", [](int64_t head_dim, const std::string& path) { return std::string(kPathNames[static_cast<int>(path_for(head_dim, parse_path(path)))]); },
        "the path a head dim takes when `path` is asked for", py::arg("head_dim"), py::arg("path") = "best");
}
