// Float math on 8 lanes with AVX2 + FMA, the counterpart of avx512_math.h for CPUs without
// AVX-512: e^x and GELU(tanh) for the small-batch linear's epilogue, and float32 -> bf16 rounding.
// Include it only where __AVX2__ and __FMA__ are defined.
//
// exp8: 2^(x log2 e) is split into 2^n * 2^f with f in [-0.5, 0.5]; 2^f comes from the same
// degree-6 polynomial as exp16, and 2^n is built in the exponent bits (x is clamped to [-87, 87],
// so n + 127 stays in [1, 254]).
#pragma once

#include <immintrin.h>

#include <cstdint>

static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5403530e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))), with tanh u = 1 - 2 / (e^2u + 1).
static inline __m256 gelu_tanh8(__m256 y) {
  const __m256 y3 = _mm256_mul_ps(_mm256_mul_ps(y, y), y);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), y3, y));
  const __m256 e = exp8(_mm256_add_ps(u, u));
  const __m256 tanh_u = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), y), _mm256_add_ps(_mm256_set1_ps(1.0f), tanh_u));
}

// 8 floats -> 8 bf16, rounded to nearest even (as PyTorch's conversion; no NaN inputs).
static inline __m128i float8_to_bf16(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_packus_epi32(u, u);  // per 128-bit lane: a0..a3 a0..a3 | a4..a7 a4..a7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}
