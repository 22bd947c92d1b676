// CUDA kernel of `safe_topk`; see safe_topk_cuda.h for the two-pass design.
//
// Scores follow torch on CUDA bit for bit: torch divides a CUDA tensor by a Python scalar as
// x * (1/t) (the reciprocal computed in float32), so this kernel does the same; the bias and
// reward terms use explicitly rounded __fmul_rn/__fsub_rn/__fadd_rn, so no fused multiply-add
// can change a bit whatever --fmad says.
//
// Selection works on 32-bit keys that order like the floats (NaN mapped to -inf first, -0.0
// to +0.0 so that it ties with +0.0 as floats do); (key descending, id ascending) is the
// reference's order, so -inf entries fill the tail with the lowest ids automatically.
#include "safe_topk_cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastsafe {
namespace {

constexpr int kThreads1 = 256;   // pass 1
constexpr int kThreads2 = 512;   // pass 2
constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr uint32_t kPadKey = 0u;              // below every real key (real keys >= key(-inf))
constexpr int32_t kPadId = 0x7fffffff;

struct Params {
  const void* logits;
  int64_t logits_row_stride;
  int64_t vocab;
  int k;
  const float* bias_table;
  int64_t bias_rows;
  const int64_t* positions;
  float bias_scale;
  const uint32_t* bitmask;
  int64_t bitmask_rows;
  int64_t words;
  const void* dense_reward;
  int64_t reward_row_stride;
  float reward_weight;
  float inv_temperature;
  int splits;
  int slice_len;
  int per_split;
  uint32_t* cand_keys;     // [batch, splits, per_split]
  int32_t* cand_ids;
  float4* stats;           // [batch, splits]: (max, sum, nan flag, +inf flag)
  float* values;
  int64_t* indices;
  float* lse;
};

// ---- keys ---------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t float_to_key(float s) {
  if (s != s) s = -INFINITY;  // NaN counts as -inf
  if (s == 0.0f) s = 0.0f;    // -0.0 ties with +0.0
  const uint32_t b = __float_as_uint(s);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t key) {
  const uint32_t b = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return __uint_as_float(b);
}

// Shared-memory index with one pad word per 32, so both strided and per-thread-contiguous
// access patterns stay (mostly) free of bank conflicts.
__device__ __forceinline__ int pad_index(int i) { return i + (i >> 5); }

// ---- element loads ------------------------------------------------------------------------

template <int kKind>
struct Elem;
template <>
struct Elem<0> {  // float32
  static constexpr int kBytes = 4;
  __device__ __forceinline__ static float load(const void* base, int64_t i) {
    return static_cast<const float*>(base)[i];
  }
  __device__ __forceinline__ static void unpack(const uint4& u, float* out) {
    out[0] = __uint_as_float(u.x);
    out[1] = __uint_as_float(u.y);
    out[2] = __uint_as_float(u.z);
    out[3] = __uint_as_float(u.w);
  }
};
// Shared by the 16-bit kinds: Derived::cvt turns one raw 16-bit value into float.
template <class Derived>
struct Elem16 {
  static constexpr int kBytes = 2;
  __device__ __forceinline__ static float load(const void* base, int64_t i) {
    return Derived::cvt(static_cast<const unsigned short*>(base)[i]);
  }
};
template <>
struct Elem<1> : Elem16<Elem<1>> {  // float16
  __device__ __forceinline__ static float cvt(unsigned short h) { return __half2float(__ushort_as_half(h)); }
  __device__ __forceinline__ static void unpack(const uint4& u, float* out) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = cvt(static_cast<unsigned short>(w[j] & 0xffffu));
      out[2 * j + 1] = cvt(static_cast<unsigned short>(w[j] >> 16));
    }
  }
};
template <>
struct Elem<2> : Elem16<Elem<2>> {  // bfloat16
  __device__ __forceinline__ static float cvt(unsigned short h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
  __device__ __forceinline__ static void unpack(const uint4& u, float* out) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = __uint_as_float(w[j] << 16);
      out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  }
};

// ---- block-wide helpers -------------------------------------------------------------------

struct BlockScratch {
  float red[kWarp];
  int scan[kWarp];
  uint32_t hist[256];
  uint32_t digit;
  int remaining;
};

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Block-wide reduction with op (identity: the value of idle lanes); every thread gets the result.
template <int kThreads, class Op>
__device__ float block_reduce(float v, float identity, Op op, BlockScratch& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
  if (lane == 0) sh.red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / kWarp ? sh.red[lane] : identity;
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFull, v, off));
    if (lane == 0) sh.red[0] = v;
  }
  __syncthreads();
  v = sh.red[0];
  __syncthreads();
  return v;
}

template <int kThreads>
__device__ float block_max(float v, BlockScratch& sh) {
  return block_reduce<kThreads>(v, -INFINITY, MaxOp{}, sh);
}

template <int kThreads>
__device__ float block_sum(float v, BlockScratch& sh) {
  return block_reduce<kThreads>(v, 0.0f, SumOp{}, sh);
}

// Exclusive prefix sum over the threads of the block, in thread order.
template <int kThreads>
__device__ int block_exclusive_scan(int v, BlockScratch& sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int incl = v;
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const int t = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += t;
  }
  if (lane == kWarp - 1) sh.scan[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kThreads / kWarp ? sh.scan[lane] : 0;
#pragma unroll
    for (int off = 1; off < kWarp; off <<= 1) {
      const int t = __shfl_up_sync(kFull, w, off);
      if (lane >= off) w += t;
    }
    sh.scan[lane] = w;  // inclusive sums of the warps
  }
  __syncthreads();
  const int result = (warp > 0 ? sh.scan[warp - 1] : 0) + incl - v;
  __syncthreads();
  return result;
}

// Radix select: the k-th largest of n keys (1 <= k <= n), 8 bits per round, most significant
// first. On return `kth` is that key and `need` how many keys equal to it belong to the top k
// (the others ranked above it are exactly the keys > kth). `get(i)` reads key i.
template <int kThreads, typename Get>
__device__ void radix_select(Get get, int n, int k, BlockScratch& sh, uint32_t& kth, int& need) {
  const int lane = threadIdx.x % kWarp;
  uint32_t prefix = 0, prefix_mask = 0;
  int remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += kThreads) sh.hist[d] = 0;
    __syncthreads();
    // Whole-block trip count, so every lane of a warp reaches the warp-synchronous calls.
    for (int base = 0; base < n; base += kThreads) {
      const int i = base + threadIdx.x;
      uint32_t key = 0;
      bool active = false;
      if (i < n) {
        key = get(i);
        active = (key & prefix_mask) == prefix;
      }
      const uint32_t digit = (key >> shift) & 0xffu;
      // Warp-aggregated increment: one atomic per distinct digit in the warp. Inactive lanes
      // match on a value no other lane has (256 + lane), so every lane joins the match.
      const unsigned peers = __match_any_sync(kFull, active ? digit : 256u + static_cast<unsigned>(lane));
      if (active && lane == __ffs(peers) - 1) atomicAdd(&sh.hist[digit], static_cast<uint32_t>(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x < kWarp) {
      // Lane l owns digits 255 - 8l down to 248 - 8l (descending), so lane order is key order.
      uint32_t c[8];
      uint32_t local = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = sh.hist[255 - (8 * lane + j)];
        local += c[j];
      }
      uint32_t incl = local;
#pragma unroll
      for (int off = 1; off < kWarp; off <<= 1) {
        const uint32_t t = __shfl_up_sync(kFull, incl, off);
        if (lane >= off) incl += t;
      }
      const uint32_t before = incl - local;  // keys whose digit ranks above this lane's digits
      const uint32_t r = static_cast<uint32_t>(remaining);
      if (before < r && r <= incl) {        // exactly one lane
        uint32_t acc = before;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (acc + c[j] >= r) {
            sh.digit = static_cast<uint32_t>(255 - (8 * lane + j));
            sh.remaining = static_cast<int>(r - acc);
            break;
          }
          acc += c[j];
        }
      }
    }
    __syncthreads();
    prefix |= sh.digit << shift;
    prefix_mask |= 0xffu << shift;
    remaining = sh.remaining;
    __syncthreads();
  }
  kth = prefix;
  need = remaining;
}

// Writes the k selected keys in position order: every key > kth, and the first `need` keys
// equal to kth (lowest positions = lowest ids). Thread t walks positions
// [t*chunk, (t+1)*chunk) so that a block scan gives each thread its output offset.
template <int kThreads, typename Get, typename Put>
__device__ void ordered_compact(Get get, int n, uint32_t kth, int need, Put put, BlockScratch& sh) {
  const int chunk = (n + kThreads - 1) / kThreads;
  const int begin = min(n, static_cast<int>(threadIdx.x) * chunk);
  const int end = min(n, begin + chunk);
  int gt = 0, eq = 0;
  for (int i = begin; i < end; ++i) {
    const uint32_t key = get(i);
    gt += key > kth;
    eq += key == kth;
  }
  const int eq_before = block_exclusive_scan<kThreads>(eq, sh);
  const int take_eq = max(0, min(eq, need - eq_before));
  int pos = block_exclusive_scan<kThreads>(gt + take_eq, sh);
  int eq_seen = eq_before;
  for (int i = begin; i < end; ++i) {
    const uint32_t key = get(i);
    if (key > kth) {
      put(pos++, key, i);
    } else if (key == kth) {
      if (eq_seen < need) put(pos++, key, i);
      ++eq_seen;
    }
  }
}

// ---- pass 1: one slice of one row ---------------------------------------------------------

template <int kKind>
__global__ void __launch_bounds__(kThreads1) split_kernel(Params p) {
  using E = Elem<kKind>;
  constexpr int kVec = 16 / E::kBytes;
  __shared__ uint32_t keys[kCudaMaxSlice + kCudaMaxSlice / 32];
  __shared__ BlockScratch sh;

  const int64_t row = blockIdx.x / p.splits;
  const int split = static_cast<int>(blockIdx.x % p.splits);
  const int64_t v0 = static_cast<int64_t>(split) * p.slice_len;
  const int n = static_cast<int>(min(static_cast<int64_t>(p.slice_len), p.vocab - v0));

  const char* xrow = static_cast<const char*>(p.logits) + (row * p.logits_row_stride + v0) * E::kBytes;
  const float* brow = nullptr;
  if (p.bias_table != nullptr) {
    int64_t pos = p.positions != nullptr ? p.positions[row] : 0;
    pos = pos < 0 ? 0 : (pos >= p.bias_rows ? p.bias_rows - 1 : pos);
    brow = p.bias_table + pos * p.vocab + v0;
  }
  const char* rrow = p.dense_reward == nullptr
                         ? nullptr
                         : static_cast<const char*>(p.dense_reward) + (row * p.reward_row_stride + v0) * E::kBytes;
  const uint32_t* mrow = p.bitmask == nullptr ? nullptr : p.bitmask + (p.bitmask_rows == 1 ? 0 : row * p.words);

  float tmax = -INFINITY;
  int tnan = 0;
  auto handle = [&](int i, float x) {
    float s = __fmul_rn(x, p.inv_temperature);
    if (brow != nullptr) s = __fsub_rn(s, __fmul_rn(p.bias_scale, brow[i]));
    if (rrow != nullptr) s = __fadd_rn(s, __fmul_rn(p.reward_weight, E::load(rrow, i)));
    if (mrow != nullptr) {
      const int64_t v = v0 + i;
      if (((mrow[v >> 5] >> (v & 31)) & 1u) == 0u) s = -INFINITY;
    }
    tnan |= (s != s);
    tmax = s > tmax ? s : tmax;
    keys[pad_index(i)] = float_to_key(s);
  };

  // 16-byte loads of the logits when the slice start is aligned; scalar loads otherwise.
  const bool aligned = (reinterpret_cast<uintptr_t>(xrow) & 15u) == 0u;
  const int n_vec = aligned ? n / kVec : 0;
  for (int j = threadIdx.x; j < n_vec; j += kThreads1) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(xrow) + j);
    float xs[kVec];
    E::unpack(u, xs);
#pragma unroll
    for (int e = 0; e < kVec; ++e) handle(j * kVec + e, xs[e]);
  }
  for (int i = n_vec * kVec + threadIdx.x; i < n; i += kThreads1) handle(i, E::load(xrow, i));
  // (block_max's barriers also publish the keys to the whole block)

  // logsumexp partial of the slice
  const float m = block_max<kThreads1>(tmax, sh);
  const int any_nan = __syncthreads_or(tnan);
  float sum = 0.0f;
  if (m > -INFINITY && m < INFINITY) {
    float part = 0.0f;
    for (int i = threadIdx.x; i < n; i += kThreads1) part += expf(key_to_float(keys[pad_index(i)]) - m);
    sum = block_sum<kThreads1>(part, sh);
  }

  // exact top min(k, n) of the slice, written in id order
  const int kc = min(p.k, n);
  uint32_t kth;
  int need;
  auto get = [&](int i) { return keys[pad_index(i)]; };
  radix_select<kThreads1>(get, n, kc, sh, kth, need);
  const int64_t out0 = (row * p.splits + split) * static_cast<int64_t>(p.per_split);
  uint32_t* okeys = p.cand_keys + out0;
  int32_t* oids = p.cand_ids + out0;
  auto put = [&](int pos, uint32_t key, int i) {
    okeys[pos] = key;
    oids[pos] = static_cast<int32_t>(v0 + i);
  };
  ordered_compact<kThreads1>(get, n, kth, need, put, sh);
  for (int pos = kc + threadIdx.x; pos < p.per_split; pos += kThreads1) {  // short last slice
    okeys[pos] = kPadKey;
    oids[pos] = kPadId;
  }
  if (threadIdx.x == 0) {
    // A slice holding +inf only flags it (its sum would be inf - inf); the merge skips it.
    const bool pinf = m == INFINITY;
    p.stats[row * p.splits + split] =
        make_float4(pinf ? -INFINITY : m, pinf ? 0.0f : sum, any_nan ? 1.0f : 0.0f, pinf ? 1.0f : 0.0f);
  }
}

// ---- pass 2: merge the splits of one row --------------------------------------------------

struct LsePart {
  float m;  // -inf: empty
  float s;
};

__device__ __forceinline__ LsePart lse_merge(LsePart a, LsePart b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float mx = fmaxf(a.m, b.m);
  return LsePart{mx, a.s * expf(a.m - mx) + b.s * expf(b.m - mx)};
}

__global__ void __launch_bounds__(kThreads2) merge_kernel(Params p) {
  __shared__ BlockScratch sh;
  __shared__ uint32_t top_keys[kCudaMaxK];
  __shared__ int32_t top_ids[kCudaMaxK];

  const int64_t row = blockIdx.x;
  const int k = p.k;

  // logsumexp: warp 0 merges the splits in a fixed order (deterministic)
  if (threadIdx.x < kWarp) {
    const int lane = threadIdx.x;
    LsePart acc{-INFINITY, 0.0f};
    float nan = 0.0f, pinf = 0.0f;
    for (int j = lane; j < p.splits; j += kWarp) {
      const float4 st = p.stats[row * p.splits + j];
      acc = lse_merge(acc, LsePart{st.x, st.y});
      nan = fmaxf(nan, st.z);
      pinf = fmaxf(pinf, st.w);
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const LsePart other{__shfl_xor_sync(kFull, acc.m, off), __shfl_xor_sync(kFull, acc.s, off)};
      acc = lse_merge(acc, other);
      nan = fmaxf(nan, __shfl_xor_sync(kFull, nan, off));
      pinf = fmaxf(pinf, __shfl_xor_sync(kFull, pinf, off));
    }
    if (lane == 0) {
      float out;
      if (nan != 0.0f) out = NAN;
      else if (pinf != 0.0f) out = INFINITY;
      else if (acc.m == -INFINITY) out = -INFINITY;
      else out = acc.m + logf(acc.s);
      p.lse[row] = out;
    }
  }

  // top k of the row's candidates (in id order, padding slots after them)
  const int n = p.splits * p.per_split;
  const uint32_t* ckeys = p.cand_keys + row * n;
  const int32_t* cids = p.cand_ids + row * n;
  uint32_t kth;
  int need;
  auto get = [&](int i) { return ckeys[i]; };
  radix_select<kThreads2>(get, n, k, sh, kth, need);
  auto put = [&](int pos, uint32_t key, int i) {
    top_keys[pos] = key;
    top_ids[pos] = cids[i];
  };
  ordered_compact<kThreads2>(get, n, kth, need, put, sh);

  // bitonic sort of the k winners: key descending, id ascending
  int width = 1;
  while (width < k) width <<= 1;
  for (int i = k + threadIdx.x; i < width; i += kThreads2) {
    top_keys[i] = kPadKey;
    top_ids[i] = kPadId;
  }
  __syncthreads();
  for (int size = 2; size <= width; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < width / 2; t += kThreads2) {
        const int i = (t / stride) * 2 * stride + (t % stride);
        const int j = i + stride;
        const uint32_t ki = top_keys[i], kj = top_keys[j];
        const int32_t ii = top_ids[i], ij = top_ids[j];
        const bool j_first = kj > ki || (kj == ki && ij < ii);
        const bool i_first = ki > kj || (ki == kj && ii < ij);
        const bool forward = (i & size) == 0;
        if (forward ? j_first : i_first) {
          top_keys[i] = kj;
          top_keys[j] = ki;
          top_ids[i] = ij;
          top_ids[j] = ii;
        }
      }
      __syncthreads();
    }
  }
  for (int r = threadIdx.x; r < k; r += kThreads2) {
    p.values[row * k + r] = key_to_float(top_keys[r]);
    p.indices[row * k + r] = top_ids[r];
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align16(size_t x) { return (x + 15) & ~static_cast<size_t>(15); }

}  // namespace

CudaTopKPlan safe_topk_cuda_plan(int64_t batch, int64_t vocab, int64_t k, int num_sms) {
  CudaTopKPlan plan;
  if (batch <= 0 || vocab <= 0 || k < 1 || k > kCudaMaxK || k > vocab) return plan;
  // Enough programs to give every SM about two, but slices of at least max(1024, 4k) tokens
  // (so pass 2 merges few candidates) and at most kCudaMaxSlice (shared memory).
  const int64_t min_slice = k * 4 > 1024 ? k * 4 : 1024;
  const int64_t fill = ceil_div(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), batch);
  int64_t splits = fill < ceil_div(vocab, min_slice) ? fill : ceil_div(vocab, min_slice);
  if (splits < ceil_div(vocab, kCudaMaxSlice)) splits = ceil_div(vocab, kCudaMaxSlice);
  if (splits < 1) splits = 1;
  int64_t slice = ceil_div(vocab, splits);
  if (splits > 1) slice = ceil_div(slice, 256) * 256;  // 16-byte aligned slice starts
  if (slice > kCudaMaxSlice) slice = kCudaMaxSlice;
  splits = ceil_div(vocab, slice);
  const int64_t per_split = k < slice ? k : slice;
  if (batch * splits > 0x7fffffffLL || splits * per_split > 0x7fffffffLL) return plan;
  const size_t ncand = static_cast<size_t>(batch * splits * per_split);
  plan.splits = splits;
  plan.slice_len = slice;
  plan.per_split = per_split;
  plan.keys_offset = 0;
  plan.ids_offset = align16(ncand * sizeof(uint32_t));
  plan.stats_offset = plan.ids_offset + align16(ncand * sizeof(int32_t));
  plan.workspace_bytes = plan.stats_offset + static_cast<size_t>(batch * splits) * sizeof(float4);
  return plan;
}

namespace {

bool plan_fits(const SafeTopKArgs& a, const CudaTopKPlan& plan) {
  return plan.splits > 0 && a.k >= 1 && a.k <= kCudaMaxK && a.k <= a.vocab && a.k <= plan.per_split * plan.splits &&
         plan.slice_len * plan.splits >= a.vocab && plan.slice_len <= kCudaMaxSlice;
}

Params make_params(const SafeTopKArgs& a, const CudaTopKPlan& plan, void* workspace) {
  Params p;
  p.logits = a.logits;
  p.logits_row_stride = a.logits_row_stride;
  p.vocab = a.vocab;
  p.k = static_cast<int>(a.k);
  p.bias_table = a.bias_table;
  p.bias_rows = a.bias_rows;
  p.positions = a.positions;
  p.bias_scale = a.bias_scale;
  p.bitmask = reinterpret_cast<const uint32_t*>(a.bitmask);
  p.bitmask_rows = a.bitmask_rows;
  p.words = bitmask_words(a.vocab);
  p.dense_reward = a.dense_reward;
  p.reward_row_stride = a.reward_row_stride;
  p.reward_weight = a.reward_weight;
  p.inv_temperature = 1.0f / a.temperature;  // as torch: x * (1/t) for a CUDA tensor
  p.splits = static_cast<int>(plan.splits);
  p.slice_len = static_cast<int>(plan.slice_len);
  p.per_split = static_cast<int>(plan.per_split);
  char* ws = static_cast<char*>(workspace);
  p.cand_keys = reinterpret_cast<uint32_t*>(ws + plan.keys_offset);
  p.cand_ids = reinterpret_cast<int32_t*>(ws + plan.ids_offset);
  p.stats = reinterpret_cast<float4*>(ws + plan.stats_offset);
  p.values = a.values;
  p.indices = a.indices;
  p.lse = a.lse;
  return p;
}

}  // namespace

// The launcher; FASTSAFE_CUDA_EMULATION builds (a CPU emulation used to test the kernels
// without a GPU) launch the kernels themselves.
#ifndef FASTSAFE_CUDA_EMULATION
cudaError_t safe_topk_cuda(const SafeTopKArgs& a, const CudaTopKPlan& plan, void* workspace, cudaStream_t stream) {
  if (a.batch <= 0) return cudaSuccess;
  if (!plan_fits(a, plan)) return cudaErrorInvalidValue;
  const Params p = make_params(a, plan, workspace);
  const unsigned grid1 = static_cast<unsigned>(a.batch * plan.splits);
  switch (a.dtype) {
    case ScalarKind::Float32:
      split_kernel<0><<<grid1, kThreads1, 0, stream>>>(p);
      break;
    case ScalarKind::Float16:
      split_kernel<1><<<grid1, kThreads1, 0, stream>>>(p);
      break;
    case ScalarKind::BFloat16:
      split_kernel<2><<<grid1, kThreads1, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  merge_kernel<<<static_cast<unsigned>(a.batch), kThreads2, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace fastsafe
