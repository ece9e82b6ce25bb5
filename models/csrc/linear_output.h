// Where a linear kernel writes y: rows of bf16 (the activations) or of float32 (an LM head's
// logits, left unrounded: bf16 keeps 8 bits of mantissa, so logits near 20 fall on steps of
// 0.125 and close candidates tie). The accumulators are float32 either way; only the epilogue's
// last store differs. `out + n` moves n elements, like a typed pointer.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace nanoserve {

struct OutRows {
  void* data;
  bool f32;

  static OutRows of(torch::Tensor& y) { return {y.data_ptr(), y.scalar_type() == at::kFloat}; }
  OutRows operator+(int64_t elements) const {
    return {static_cast<char*>(data) + elements * (f32 ? 4 : 2), f32};
  }
  float* floats() const { return static_cast<float*>(data); }
  at::BFloat16* bf16() const { return static_cast<at::BFloat16*>(data); }
};

// y (M, N): float32 when asked for, else the activations' dtype.
inline torch::Tensor new_output(const torch::Tensor& x, int64_t M, int64_t N, bool float_output) {
  return torch::empty({M, N}, x.options().dtype(float_output ? at::kFloat : x.scalar_type()));
}

}  // namespace nanoserve
