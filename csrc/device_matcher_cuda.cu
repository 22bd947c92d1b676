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

struct AdvanceParams {
  MatcherTables t;
  const int64_t* state;
  int64_t width;
  const int64_t* tokens;
  int64_t batch;
  int64_t* out;
};

struct BitmaskParams {
  MatcherTables t;
  const int64_t* state;
  int64_t width;
  int32_t* words;
};

struct CheckParams {
  MatcherTables t;
  const int64_t* state;
  int64_t width;
  const int64_t* cand;
  int64_t n_items;
  int64_t k;
  bool* ok;
  int32_t* entity;
};

// One thread per row.
__global__ void __launch_bounds__(kThreads) advance_kernel(const AdvanceParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.batch) return;
  advance_row(p.t, p.state + b * p.width, p.out + b * p.width, p.width, p.tokens[b]);
}

// One block per row: the threads copy base, then apply the chain's nodes one after another (a
// node's pairs have distinct words, so thread j applies pairs j, j + blockDim, ...; a barrier
// separates nodes). The chain walk is the same in every thread (no divergent barrier).
__global__ void __launch_bounds__(kBitmaskThreads) bitmask_kernel(const BitmaskParams p) {
  const MatcherTables& t = p.t;
  const int64_t b = blockIdx.x;
  const int64_t W = t.words;
  int32_t* row = p.words + b * W;
  for (int64_t w = threadIdx.x; w < W; w += blockDim.x) row[w] = t.base[w];
  __syncthreads();        // a ban pair may hit a word another thread copied
  const int64_t s = clamp64(p.state[b * p.width + kStTok], 0, t.tok_states - 1);
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
__global__ void __launch_bounds__(kThreads) check_kernel(const CheckParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.n_items) return;
  check_one(p.t, p.state + (i / p.k) * p.width, p.cand[i], p.ok + i, p.entity + i);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

#ifndef FASTSAFE_CUDA_EMULATION
cudaError_t matcher_advance_cuda(const MatcherTables& t, const int64_t* state, int64_t width, const int64_t* tokens,
                                 int64_t batch, int64_t* out, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  const AdvanceParams p{t, state, width, tokens, batch, out};
  advance_kernel<<<blocks_for(batch, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t matcher_banned_bitmask_cuda(const MatcherTables& t, const int64_t* state, int64_t width, int64_t batch,
                                        int32_t* words, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (batch > 0x7FFFFFFF) return cudaErrorInvalidValue;
  const BitmaskParams p{t, state, width, words};
  bitmask_kernel<<<static_cast<unsigned>(batch), kBitmaskThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t matcher_check_candidates_cuda(const MatcherTables& t, const int64_t* state, int64_t width,
                                          const int64_t* cand, int64_t batch, int64_t k, bool* ok, int32_t* entity,
                                          cudaStream_t stream) {
  const int64_t n = batch * k;
  if (n <= 0) return cudaSuccess;
  const CheckParams p{t, state, width, cand, n, k, ok, entity};
  check_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace fastsafe
