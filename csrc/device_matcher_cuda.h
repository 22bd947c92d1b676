// CUDA kernels of the device matcher's step (raw pointers and a stream; no torch headers, so plain
// `nvcc -std=c++17 -Icsrc -c csrc/device_matcher_cuda.cu` compile-checks it). The per-row work is
// the shared code of device_matcher_step.h; states are clamped into range in the kernels (no host
// check: that would synchronise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "device_matcher_step.h"

namespace fastsafe {

// The fields of `call` each op uses are listed at MatcherCall (device pointers). Each returns the
// launch error.
// advance: one thread per row.
cudaError_t matcher_advance_cuda(const MatcherTables& t, const MatcherCall& call, cudaStream_t stream);

// banned_bitmask: one block per row; the threads copy `base` and apply the row's bans to their own words.
cudaError_t matcher_banned_bitmask_cuda(const MatcherTables& t, const MatcherCall& call, cudaStream_t stream);

// check_candidates: one thread per (row, candidate).
cudaError_t matcher_check_candidates_cuda(const MatcherTables& t, const MatcherCall& call, cudaStream_t stream);

}  // namespace fastsafe
