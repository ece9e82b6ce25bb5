// Paged decode attention for CPU: one query per sequence, keys and values read in place from
// the block pool through the block table, no gather. One task per sequence: for each cached
// token it widens the token's whole (KVH, D) key row once and scores all H query heads against
// it (pass 1), takes a numerically stable softmax per head (pass 2), then accumulates the value
// rows the same way (pass 3), all in float32. Token-major rows keep every read contiguous.
//
//   q (S, H, D)   k_pool, v_pool (NB, BS, KVH, D)   block_tables (S, MB)   seq_lens (S,)
//   token p of sequence s lives at k_pool[block_tables[s][p / BS]][p % BS][:][:]
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
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
};

template <typename T>
static void decode_sequence(const T* q, const T* k_pool, const T* v_pool, const int64_t* table, int64_t len,
                            T* out, const Shape& sh, std::vector<float>& buf) {
  const int64_t H = sh.H, D = sh.D, G = sh.H / sh.KVH, row_len = sh.KVH * sh.D;
  buf.resize(H * D + row_len + H * len + H * D);
  float* qf = buf.data();            // (H, D) scaled queries
  float* row = qf + H * D;           // (KVH, D) one token's keys or values
  float* scores = row + row_len;     // (H, len)
  float* acc = scores + H * len;     // (H, D)
  to_float(q, qf, H * D);
  for (int64_t i = 0; i < H * D; ++i) qf[i] *= sh.scale;
  auto token_row = [&](const T* pool, int64_t p) { return pool + (table[p / sh.BS] * sh.BS + p % sh.BS) * row_len; };
  // pass 1: scores[h][p] = q_h . k_p[h / G]
  for (int64_t p = 0; p < len; ++p) {
    to_float(token_row(k_pool, p), row, row_len);
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
    to_float(token_row(v_pool, p), row, row_len);
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

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous inputs required");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64, "int64 tables");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "dtype mismatch");
  const int64_t S = q.size(0), MB = block_tables.size(1);
  const Shape sh{q.size(1), k_pool.size(2), q.size(2), k_pool.size(1), static_cast<float>(scale)};
  TORCH_CHECK(sh.H % sh.KVH == 0 && k_pool.size(3) == sh.D, "shape mismatch");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_pool.data_ptr<scalar_t>();
    const scalar_t* vp = v_pool.data_ptr<scalar_t>();
    const int64_t* tp = tables.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t s = begin; s < end; ++s) {
        TORCH_CHECK(lp[s] >= 1 && lp[s] <= MB * sh.BS, "sequence length outside its block table");
        decode_sequence<scalar_t>(qp + s * sh.H * sh.D, kp, vp, tp + s * MB, lp[s], op + s * sh.H * sh.D, sh, buf);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
