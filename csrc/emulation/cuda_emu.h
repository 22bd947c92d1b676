// A minimal CPU emulation of the CUDA features that csrc/safe_topk_cuda.cu uses, so that its
// kernels can be tested on a machine without a GPU (tests/test_native_build.py builds
// run_safe_topk.cpp with it). One OS thread per CUDA thread with real barriers for
// __syncthreads and for the warp-synchronous intrinsics (every lane of the warp must take part,
// as with a full mask); blocks run one after another, so `__shared__` becomes `static`.
// Slow (hundreds of threads per block) and only as faithful as these few definitions: it
// checks indexing, synchronisation structure and the selection logic, not timing or memory
// ordering subtleties of real hardware.
#pragma once
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline thread_local dim3 threadIdx, blockIdx, blockDim;

struct EmuBlock {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<std::array<uint64_t, 32>> slots;
  std::atomic<int> or_acc{0};
};
inline EmuBlock* g_block = nullptr;

inline void __syncthreads() { g_block->bar->arrive_and_wait(); }
inline int __syncthreads_or(int p) {
  __syncthreads();
  if (p) g_block->or_acc.store(1);
  __syncthreads();
  int r = g_block->or_acc.load();
  __syncthreads();
  if (threadIdx.x == 0) g_block->or_acc.store(0);
  __syncthreads();
  return r;
}

template <typename T, typename SrcFn>
T emu_exchange(T v, SrcFn src) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto& slots = g_block->slots[warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane] = bits;
  g_block->warp_bars[warp]->arrive_and_wait();
  T r;
  uint64_t got = slots[src(lane)];
  std::memcpy(&r, &got, sizeof(T));
  g_block->warp_bars[warp]->arrive_and_wait();
  return r;
}
template <typename T> T __shfl_xor_sync(unsigned, T v, int off) { return emu_exchange(v, [&](int l) { return l ^ off; }); }
template <typename T> T __shfl_up_sync(unsigned, T v, int off) { return emu_exchange(v, [&](int l) { return l >= off ? l - off : l; }); }
inline unsigned emu_gather_mask(uint32_t mine, bool (*eq)(uint32_t, uint32_t)) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto& slots = g_block->slots[warp];
  slots[lane] = mine;
  g_block->warp_bars[warp]->arrive_and_wait();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) if (eq(static_cast<uint32_t>(slots[l]), mine)) m |= 1u << l;
  g_block->warp_bars[warp]->arrive_and_wait();
  return m;
}
inline unsigned __ballot_sync(unsigned, int p) {
  return emu_gather_mask(p ? 1u : 0u, [](uint32_t a, uint32_t) { return a == 1u; });
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
  return emu_gather_mask(v, [](uint32_t a, uint32_t b) { return a == b; });
}
inline int __ffs(unsigned x) { return x == 0 ? 0 : __builtin_ctz(x) + 1; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
template <typename T> T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <typename T> T min(T a, T b) { return a < b ? a : b; }
template <typename T> T max(T a, T b) { return a < b ? b : a; }

struct __half { unsigned short x; };
inline __half __ushort_as_half(unsigned short x) { return __half{x}; }
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t em = h.x & 0x7fffu;
  const uint32_t shifted = em << 13;
  uint32_t bits = __float_as_uint(__uint_as_float(shifted) * 0x1p112f);
  bits = em >= 0x7c00u ? (shifted | 0x7f800000u) : bits;
  return __uint_as_float(bits | sign);
}

template <typename Kernel, typename P>
void emu_launch(Kernel kernel, unsigned grid, unsigned threads, const P& p) {
  for (unsigned b = 0; b < grid; ++b) {
    EmuBlock blk;
    blk.bar = std::make_unique<std::barrier<>>(threads);
    for (unsigned w = 0; w < threads / 32; ++w) blk.warp_bars.push_back(std::make_unique<std::barrier<>>(32));
    blk.slots.resize(threads / 32);
    g_block = &blk;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t)
      ts.emplace_back([&, t] { threadIdx.x = t; blockIdx.x = b; blockDim.x = threads; kernel(p); });
    for (auto& t : ts) t.join();
  }
}
