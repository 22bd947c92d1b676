// Arguments of the fused decoding step `safe_topk`, shared by the CPU and CUDA kernels.
//
// Plain C++ (no torch, no CUDA headers): the binding (bindings.cpp) fills this struct from
// validated tensors; the kernels only see raw pointers.
//
//   score[b, v] = logits[b, v] / temperature                        (float32, in this order)
//               - bias_scale * bias_table[positions[b], v]            (if bias_table)
//               + reward_weight * dense_reward[b, v]                  (if dense_reward)
//   score[b, v] = -inf if bit (v % 32) of banned_bitmask[b][v / 32] is 0
//
// Outputs: the k highest scores per row (descending; ties by lower token id; NaN counts as
// -inf; -inf entries fill the tail with the lowest ids not already chosen), their ids, and the
// logsumexp over all V scores (NaN if an allowed score is NaN, -inf if no score is finite).
#pragma once

#include <cstdint>

namespace fastsafe {

enum class ScalarKind : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

struct SafeTopKArgs {
  // logits [batch, vocab]: element (b, v) at logits + b * logits_row_stride + v (element units).
  const void* logits = nullptr;
  int64_t logits_row_stride = 0;
  ScalarKind dtype = ScalarKind::Float32;  // of logits and dense_reward
  int64_t batch = 0;
  int64_t vocab = 0;
  int64_t k = 0;  // 1 <= k <= vocab

  // Optional TSDI bias: float32 [bias_rows, vocab] contiguous; positions int64 [batch].
  const float* bias_table = nullptr;
  int64_t bias_rows = 0;
  const int64_t* positions = nullptr;  // may be null: row 0 for every batch row
  float bias_scale = 1.0f;

  // Optional packed int32 bitmask, bit = 1 means allowed; [bitmask_rows, ceil(vocab / 32)]
  // with bitmask_rows == 1 (shared by every row) or == batch.
  const int32_t* bitmask = nullptr;
  int64_t bitmask_rows = 0;

  // Optional dense reward [batch, vocab] in `dtype`, element (b, v) at
  // dense_reward + b * reward_row_stride + v.
  const void* dense_reward = nullptr;
  int64_t reward_row_stride = 0;
  float reward_weight = 0.0f;

  float temperature = 1.0f;  // > 0

  // Outputs (contiguous): values float32 [batch, k], indices int64 [batch, k], lse float32 [batch].
  float* values = nullptr;
  int64_t* indices = nullptr;
  float* lse = nullptr;
};

inline int64_t bitmask_words(int64_t vocab) { return (vocab + 31) / 32; }

}  // namespace fastsafe
