// CUDA kernels of the device matcher's step (raw pointers and a stream; no torch headers, so plain
// `nvcc -std=c++17 -Icsrc -c csrc/device_matcher_cuda.cu` compile-checks it). The per-row work is
// the shared code of device_matcher_step.h; states are clamped into range in the kernels (no host
// check: that would synchronise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "device_matcher_step.h"

namespace fastsafe {

// One thread per row. Returns the launch error.
cudaError_t matcher_advance_cuda(const MatcherTables& t, const int64_t* state, int64_t width, const int64_t* tokens,
                                 int64_t batch, int64_t* out, cudaStream_t stream);

// One block per row: the threads copy `base` and apply the row's bans to their own words.
cudaError_t matcher_banned_bitmask_cuda(const MatcherTables& t, const int64_t* state, int64_t width, int64_t batch,
                                        int32_t* words, cudaStream_t stream);

// One thread per (row, candidate).
cudaError_t matcher_check_candidates_cuda(const MatcherTables& t, const int64_t* state, int64_t width,
                                          const int64_t* cand, int64_t batch, int64_t k, bool* ok, int32_t* entity,
                                          cudaStream_t stream);

}  // namespace fastsafe
