// C++ CPU kernels of the device matcher's step (see device_matcher_step.h for the per-row work).
#pragma once

#include <cstdint>

#include "device_matcher_step.h"

namespace fastsafe {

// state [B, width] int64 (width >= 6), tokens [B] int64 -> out [B, width].
void matcher_advance_cpu(const MatcherTables& t, const int64_t* state, int64_t width, const int64_t* tokens,
                         int64_t batch, int64_t* out, int threads);

// state [B, width] -> words [B, W] int32 (bit 1 = allowed).
void matcher_banned_bitmask_cpu(const MatcherTables& t, const int64_t* state, int64_t width, int64_t batch,
                                int32_t* words, int threads);

// state [B, width], candidates [B, k] int64 -> ok [B, k] bool, entity [B, k] int32.
void matcher_check_candidates_cpu(const MatcherTables& t, const int64_t* state, int64_t width, const int64_t* cand,
                                  int64_t batch, int64_t k, bool* ok, int32_t* entity, int threads);

}  // namespace fastsafe
