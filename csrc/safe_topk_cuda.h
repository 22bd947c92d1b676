// CUDA kernel of `safe_topk` (raw pointers and a stream; no torch headers, so plain
// `nvcc -std=c++17 -Icsrc -c csrc/safe_topk_cuda.cu` compile-checks it).
//
// Pass 1, grid (batch x splits): each program scores one slice of a row (<= kCudaMaxSlice
// tokens, read once with 16-byte loads when aligned), keeps the slice as order-preserving keys
// in shared memory, and writes the slice's (max, sum exp) and its exact top min(k, slice)
// candidates (radix select, ties by lower id) in id order.
// Pass 2, one program per row: merges the splits' logsumexp partials, radix-selects the k best
// of the splits' candidates (ties by lower id) and sorts them (bitonic, in shared memory).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "safe_topk_args.h"

namespace fastsafe {

constexpr int64_t kCudaMaxK = 1024;       // pass 2 sorts the k winners in shared memory
constexpr int64_t kCudaMaxSlice = 8192;   // tokens per pass-1 program (shared-memory keys)

struct CudaTopKPlan {
  int64_t splits = 0;       // pass-1 programs per row (0: shape unsupported)
  int64_t slice_len = 0;    // tokens per split (the last split may be shorter)
  int64_t per_split = 0;    // candidate slots per split = min(k, slice_len)
  size_t keys_offset = 0;   // workspace layout (bytes)
  size_t ids_offset = 0;
  size_t stats_offset = 0;
  size_t workspace_bytes = 0;
};

// Chooses the split of V so that about two programs per SM run even for a small batch.
CudaTopKPlan safe_topk_cuda_plan(int64_t batch, int64_t vocab, int64_t k, int num_sms);

// Launches both passes on `stream`. `workspace` (device memory, 16-byte aligned) holds
// plan.workspace_bytes bytes. Requires 1 <= k <= min(vocab, kCudaMaxK). Returns the launch error.
cudaError_t safe_topk_cuda(const SafeTopKArgs& args, const CudaTopKPlan& plan, void* workspace,
                           cudaStream_t stream);

}  // namespace fastsafe
