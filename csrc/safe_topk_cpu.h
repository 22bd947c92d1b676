// C++ CPU kernel of `safe_topk` (raw pointers; no torch headers).
#pragma once

#include "safe_topk_args.h"

namespace fastsafe {

// Token-block length of one CPU task (a multiple of 32, so blocks start on bitmask words).
// Fixed, so results do not depend on the number of threads.
constexpr int64_t kCpuBlock = 4096;

// Runs the fused step over all rows with OpenMP tasks over (row, block of kCpuBlock tokens),
// using `num_threads` threads (<= 1: serial). The arguments must already be validated
// (see bindings.cpp): 1 <= k <= vocab < 2^31, positions within [0, bias_rows).
void safe_topk_cpu(const SafeTopKArgs& args, int num_threads);

}  // namespace fastsafe
