// C++ CPU kernel of `safe_topk` (raw pointers; no torch headers).
#pragma once

#include "safe_topk_args.h"

namespace fastsafe {

// Token-block length of one CPU task (a multiple of 32, so blocks start on bitmask words).
// Fixed, so results do not depend on the number of threads.
constexpr int64_t kCpuBlock = 4096;

// Runs the fused step over all rows with OpenMP tasks over (row, segment of blocks of
// kCpuBlock tokens), using `num_threads` threads (<= 1: serial); the result does not depend on
// the thread count. The arguments must already be validated (see bindings.cpp):
// 1 <= k <= vocab < 2^31; positions are clamped to [0, bias_rows - 1] here.
void safe_topk_cpu(const SafeTopKArgs& args, int num_threads);

// Instruction set of the vector loops chosen for this CPU: "avx512f", "avx2" or "baseline"
// (FASTSAFE_CPU_ISA=baseline|avx2 caps the choice).
const char* safe_topk_cpu_isa();

}  // namespace fastsafe
