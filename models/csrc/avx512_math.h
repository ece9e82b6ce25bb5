// Float math on 16 lanes with AVX-512F, shared by the kernels in this folder: e^x (the decode
// attention's softmax) and GELU(tanh) (the small-batch linears' epilogue). Include it only where
// __AVX512F__ is defined.
//
// exp16: 2^(x log2 e) is split into 2^n * 2^f with f in [-0.5, 0.5]; 2^f comes from a degree-6 Taylor
// polynomial (relative error ~1e-7) and 2^n is applied exactly by scalef. x is clamped to
// [-87, 87], where float32 neither overflows nor flushes to zero.
#pragma once

#include <immintrin.h>

static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))), with tanh u = 1 - 2 / (e^2u + 1).
static inline __m512 gelu_tanh(__m512 y) {
  const __m512 y3 = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), y3, y));
  const __m512 e = exp16(_mm512_add_ps(u, u));
  const __m512 tanh_u = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), y), _mm512_add_ps(_mm512_set1_ps(1.0f), tanh_u));
}
