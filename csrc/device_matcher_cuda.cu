// CUDA kernels of the device matcher's step; see device_matcher_cuda.h. Each kernel takes one
// parameter struct by value (kernel parameter space; the tables struct inside holds device
// pointers). FASTSAFE_CUDA_EMULATION builds (csrc/emulation/run_device_matcher.cpp, a CPU
// emulation used to test the kernels without a GPU) launch the kernels themselves.
#include "device_matcher_cuda.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace fastsafe {

namespace {

constexpr int kThreads = 128;           // rows / candidates per block
constexpr int kBitmaskThreads = 256;    // threads per row of the bitmask

// The kernels' one parameter struct.
struct StepParams {
  MatcherTables t;
  MatcherCall c;
};

// One thread per row.
__global__ void __launch_bounds__(kThreads) advance_kernel(const StepParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const MatcherCall& c = p.c;
  if (b >= c.batch) return;
  advance_row(p.t, c.state + b * c.width, c.out_state + b * c.width, c.width, c.ids[b]);
}

// One block per row: the threads copy base, then apply the chain's nodes one after another (a
// node's pairs have distinct words, so thread j applies pairs j, j + blockDim, ...; a barrier
// separates nodes). The chain walk is the same in every thread (no divergent barrier).
__global__ void __launch_bounds__(kBitmaskThreads) bitmask_kernel(const StepParams p) {
  const MatcherTables& t = p.t;
  const int64_t b = blockIdx.x;
  const int64_t W = t.words;
  int32_t* row = p.c.words + b * W;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) row[w] = t.base[w];
  __syncthreads();        // a ban pair may hit a word another thread copied
  const int64_t s = clamp64(p.c.state[b * p.c.width + kStTok], 0, t.tok_states - 1);
  int64_t node = t.ban_first[s];
  for (int32_t d = 0; d < t.ban_depth && node >= 0; ++d) {
    const int64_t off = t.ban_off[node], cnt = t.ban_cnt[node];
    for (int64_t j = threadIdx.x; j < cnt; j += blockDim.x) row[t.ban_word[off + j]] &= t.ban_mask[off + j];
    const int64_t h = t.heavy_id[node];
    if (h > 0) {            // heavy nodes have no pairs (cnt = 0)
      const int32_t* hr = t.heavy_rows + h * W;
      for (int64_t w = threadIdx.x; w < W; w += blockDim.x) row[w] &= hr[w];
    }
    __syncthreads();      // the next node's pairs may hit a word another thread just wrote
    node = t.ban_next[node];
  }
}

// One thread per (row, candidate).
__global__ void __launch_bounds__(kThreads) check_kernel(const StepParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const MatcherCall& c = p.c;
  if (i >= c.batch * c.k) return;
  check_one(p.t, c.state + (i / c.k) * c.width, c.ids[i], c.ok + i, c.entity + i);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

#ifndef FASTSAFE_CUDA_EMULATION
cudaError_t matcher_advance_cuda(const MatcherTables& t, const MatcherCall& call, cudaStream_t stream) {
  if (call.batch <= 0) return cudaSuccess;
  advance_kernel<<<blocks_for(call.batch, kThreads), kThreads, 0, stream>>>(StepParams{t, call});
  return cudaGetLastError();
}

cudaError_t matcher_banned_bitmask_cuda(const MatcherTables& t, const MatcherCall& call, cudaStream_t stream) {
  if (call.batch <= 0) return cudaSuccess;
  if (call.batch > 0x7FFFFFFF) return cudaErrorInvalidValue;
  bitmask_kernel<<<static_cast<unsigned>(call.batch), kBitmaskThreads, 0, stream>>>(StepParams{t, call});
  return cudaGetLastError();
}

cudaError_t matcher_check_candidates_cuda(const MatcherTables& t, const MatcherCall& call, cudaStream_t stream) {
  const int64_t n = call.batch * call.k;
  if (n <= 0) return cudaSuccess;
  check_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(StepParams{t, call});
  return cudaGetLastError();
}
#endif

}  // namespace fastsafe
