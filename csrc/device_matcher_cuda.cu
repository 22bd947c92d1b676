// CUDA kernels of the device matcher's step; see device_matcher_cuda.h. The tables struct is
// passed by value (kernel parameter space), its pointers are device memory.
#include "device_matcher_cuda.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace fastsafe {

namespace {

constexpr int kThreads = 128;           // rows / candidates per block
constexpr int kBitmaskThreads = 256;    // words of one row per block pass

__global__ void __launch_bounds__(kThreads) advance_kernel(MatcherTables t, const int64_t* __restrict__ state,
                                                           int64_t width, const int64_t* __restrict__ tokens,
                                                           int64_t batch, int64_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  advance_row(t, state + b * width, out + b * width, width, tokens[b]);
}

// One block per row: the threads copy base, then apply the chain's nodes one after another (a
// node's pairs have distinct words, so thread j applies pairs j, j + blockDim, ...; a barrier
// separates nodes). The chain walk is the same in every thread (no divergent barrier).
__global__ void __launch_bounds__(kBitmaskThreads) bitmask_kernel(MatcherTables t, const int64_t* __restrict__ state,
                                                                  int64_t width, int32_t* __restrict__ words) {
  const int64_t b = blockIdx.x;
  const int64_t W = t.words;
  int32_t* row = words + b * W;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) row[w] = t.base[w];
  __syncthreads();        // a ban pair may hit a word another thread copied
  const int64_t s = clamp64(state[b * width + kStTok], 0, t.tok_states - 1);
  int64_t node = t.ban_first[s];
  for (int32_t d = 0; d < t.ban_depth && node >= 0; ++d) {
    const int64_t off = t.ban_off[node], cnt = t.ban_cnt[node];
    // pairs of a node have distinct words: thread j % blockDim applies pair j
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

__global__ void __launch_bounds__(kThreads) check_kernel(MatcherTables t, const int64_t* __restrict__ state,
                                                         int64_t width, const int64_t* __restrict__ cand,
                                                         int64_t n_items, int64_t k, bool* __restrict__ ok,
                                                         int32_t* __restrict__ entity) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_items) return;
  check_one(t, state + (i / k) * width, cand[i], ok + i, entity + i);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

cudaError_t matcher_advance_cuda(const MatcherTables& t, const int64_t* state, int64_t width, const int64_t* tokens,
                                 int64_t batch, int64_t* out, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  advance_kernel<<<blocks_for(batch, kThreads), kThreads, 0, stream>>>(t, state, width, tokens, batch, out);
  return cudaGetLastError();
}

cudaError_t matcher_banned_bitmask_cuda(const MatcherTables& t, const int64_t* state, int64_t width, int64_t batch,
                                        int32_t* words, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (batch > 0x7FFFFFFF) return cudaErrorInvalidValue;
  bitmask_kernel<<<static_cast<unsigned>(batch), kBitmaskThreads, 0, stream>>>(t, state, width, words);
  return cudaGetLastError();
}

cudaError_t matcher_check_candidates_cuda(const MatcherTables& t, const int64_t* state, int64_t width,
                                          const int64_t* cand, int64_t batch, int64_t k, bool* ok, int32_t* entity,
                                          cudaStream_t stream) {
  const int64_t n = batch * k;
  if (n <= 0) return cudaSuccess;
  check_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(t, state, width, cand, n, k, ok, entity);
  return cudaGetLastError();
}

}  // namespace fastsafe
