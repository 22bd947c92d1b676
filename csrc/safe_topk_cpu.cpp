// C++ CPU kernel of `safe_topk`: one pass over the logits, OpenMP over (row, block of V).
//
// Each task (row b, tokens [v0, v0 + n), n <= kCpuBlock) does:
//   1. scores into a small float buffer (tight loops the compiler vectorises: dtype
//      conversion, / temperature, - bias_scale * bias, + reward_weight * reward, bitmask);
//   2. block max (NaN and +inf flagged), then sum of exp(score - max) (vectorisable expf);
//   3. a k-best selection: a candidate buffer behind a threshold; a 16-wide chunk whose
//      elements are all <= threshold costs one vector compare; when the buffer holds 2k
//      candidates it is cut back to the k best (nth_element) and the threshold rises.
// Then per row: merge the blocks' (max, sum) pairs into the logsumexp and the blocks'
// candidates into the sorted top k; -inf slots take the lowest ids not chosen.
//
// Only finite or +inf scores are candidates (NaN and -inf count as -inf, never selected
// ahead of a real score). Blocks are fixed (kCpuBlock) and merged in a fixed order, so the
// result does not depend on the thread count.
#include "safe_topk_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Function multi-versioning: the hot loops are compiled for AVX-512, AVX2 and the baseline,
// and the loader picks the best one for the running CPU (GCC on x86-64 only). Contraction to
// FMA is off (-ffp-contract=off), so every version computes bitwise identical scores.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTSAFE_NO_TARGET_CLONES)
#define FASTSAFE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSAFE_CLONES
#endif

#define FASTSAFE_INLINE inline __attribute__((always_inline))

namespace fastsafe {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;  // width of the lane-wise accumulators and selection chunks

FASTSAFE_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FASTSAFE_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float, exact for every input (normals, subnormals, inf, NaN), branch-free.
FASTSAFE_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t shifted = em << 13;
  // Exponent re-bias by a multiply with 2^112: exact, and turns half subnormals into normals.
  uint32_t bits = float_to_bits(bits_to_float(shifted) * 0x1p112f);
  bits = em >= 0x7c00u ? (shifted | 0x7f800000u) : bits;  // inf / NaN keep their payload
  return bits_to_float(bits | sign);
}

FASTSAFE_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

struct F32Load {
  FASTSAFE_INLINE float operator()(float x) const { return x; }
};
struct HalfLoad {
  FASTSAFE_INLINE float operator()(uint16_t h) const { return half_to_float(h); }
};
struct BF16Load {
  FASTSAFE_INLINE float operator()(uint16_t h) const { return bf16_to_float(h); }
};

// exp(x) for the logsumexp, vectorisable (no calls, no table), about 2 ulp (degree-6 Taylor: |r|^7/7! < 1.2e-7 relative) for
// -87.3 <= x <= 88; 0 below (including -inf); NaN for NaN. Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, then a polynomial and a 2^n scale.
FASTSAFE_INLINE float exp_f32(float x) {
  constexpr float kLo = -87.33654f;     // ~ ln(FLT_MIN): 2^n stays a normal float
  constexpr float kHi = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;          // 355/512: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;       // ln2 - kLn2Hi
  constexpr float kRound = 12582912.0f;           // 1.5 * 2^23: adding it rounds to an integer
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const float shifted = xc * kLog2e + kRound;
  const float n = shifted - kRound;
  const uint32_t n_int = float_to_bits(shifted) - 0x4B400000u;  // n as two's complement
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float((n_int + 127u) << 23);
  const float y = p * scale;
  return x < kLo ? 0.0f : y;
}

// ---- step 1: scores of one block --------------------------------------------------------

struct RowInputs {
  const void* logits;      // row start
  const float* bias;       // row of the table, or null
  const void* reward;      // row start, or null
  const uint32_t* mask;    // row of words, or null
};

enum class ScaleMode { Copy, Multiply, Divide };

// Dividing by a power of two and multiplying by its (exact) reciprocal round identically,
// barring a subnormal reciprocal.
inline ScaleMode scale_mode(float t) {
  if (t == 1.0f) return ScaleMode::Copy;
  int e = 0;
  const float mant = std::frexp(t, &e);
  return (mant == 0.5f && e > -125 && e < 126) ? ScaleMode::Multiply : ScaleMode::Divide;
}

template <typename T, typename LoadFn>
FASTSAFE_INLINE void scale_loop(const T* __restrict x, int64_t n, ScaleMode mode, float t, float inv,
                                float* __restrict out, LoadFn load) {
  if (mode == ScaleMode::Copy) {
    for (int64_t i = 0; i < n; ++i) out[i] = load(x[i]);
  } else if (mode == ScaleMode::Multiply) {
    for (int64_t i = 0; i < n; ++i) out[i] = load(x[i]) * inv;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = load(x[i]) / t;
  }
}

template <typename LoadFn>
FASTSAFE_INLINE void reward_loop(const uint16_t* r, int64_t n, float w, float* out, LoadFn load) {
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] + w * load(r[i]);
}

FASTSAFE_CLONES
void block_scores(const RowInputs& row, ScalarKind dtype, int64_t v0, int64_t n, float temperature,
                  float bias_scale, float reward_weight, float* __restrict out) {
  // x / t is computed as a division (bitwise what torch computes on the CPU), except where a
  // multiply gives the same correctly rounded result: t == 1, or t a power of two.
  const ScaleMode mode = scale_mode(temperature);
  const float inv = 1.0f / temperature;
  if (dtype == ScalarKind::Float32) {
    scale_loop(static_cast<const float*>(row.logits) + v0, n, mode, temperature, inv, out, F32Load{});
  } else if (dtype == ScalarKind::Float16) {
    scale_loop(static_cast<const uint16_t*>(row.logits) + v0, n, mode, temperature, inv, out, HalfLoad{});
  } else {
    scale_loop(static_cast<const uint16_t*>(row.logits) + v0, n, mode, temperature, inv, out, BF16Load{});
  }
  if (row.bias != nullptr) {
    const float* bias = row.bias + v0;
    for (int64_t i = 0; i < n; ++i) out[i] = out[i] - bias_scale * bias[i];
  }
  if (row.reward != nullptr) {
    if (dtype == ScalarKind::Float32) {
      const float* r = static_cast<const float*>(row.reward) + v0;
      for (int64_t i = 0; i < n; ++i) out[i] = out[i] + reward_weight * r[i];
    } else if (dtype == ScalarKind::Float16) {
      reward_loop(static_cast<const uint16_t*>(row.reward) + v0, n, reward_weight, out, HalfLoad{});
    } else {
      reward_loop(static_cast<const uint16_t*>(row.reward) + v0, n, reward_weight, out, BF16Load{});
    }
  }
  if (row.mask != nullptr) {
    const uint32_t* words = row.mask + v0 / 32;  // v0 is a multiple of 32
    const int64_t full = n / 32;
    for (int64_t w = 0; w < full; ++w) {
      const uint32_t word = words[w];
      float* o = out + 32 * w;
      if (word == 0xffffffffu) continue;
      if (word == 0u) {
        for (int j = 0; j < 32; ++j) o[j] = -kInf;
        continue;
      }
      for (int j = 0; j < 32; ++j) o[j] = (word & (1u << j)) != 0u ? o[j] : -kInf;
    }
    const int64_t rest = n - 32 * full;
    if (rest > 0) {
      const uint32_t word = words[full];
      float* o = out + 32 * full;
      for (int64_t j = 0; j < rest; ++j) o[j] = ((word >> j) & 1u) != 0u ? o[j] : -kInf;
    }
  }
}

// ---- step 2: block max and sum of exponentials --------------------------------------------

struct BlockStats {
  float max = -kInf;  // max over non-NaN scores (may be +inf)
  float sum = 0.0f;   // sum of exp(score - max) when max is finite
  bool nan = false;   // some score is NaN
};

// The reductions below use `omp simd reduction` so the compiler may vectorise them without
// -ffast-math (reassociation of max/sum/or is allowed by the pragma).
FASTSAFE_CLONES
void block_max(const float* __restrict s, int64_t n, float* max_out, bool* nan_out) {
  float m = -kInf;
  uint32_t any_nan = 0;
#pragma omp simd reduction(max : m) reduction(| : any_nan)
  for (int64_t i = 0; i < n; ++i) {
    const float x = s[i];
    const uint32_t is_nan = x != x;
    const float y = is_nan ? -kInf : x;  // NaN is flagged, and ignored by the max
    m = y > m ? y : m;
    any_nan |= is_nan;
  }
  *max_out = m;
  *nan_out = any_nan != 0;
}

FASTSAFE_CLONES
float block_sumexp(const float* __restrict s, int64_t n, float m) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += exp_f32(s[i] - m);
  return total;
}

// ---- step 3: k-best selection -------------------------------------------------------------

struct Cand {
  float value;
  int32_t id;
};

// a before b: higher value first, equal values by lower id.
FASTSAFE_INLINE bool better(const Cand& a, const Cand& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// Keeps the k best of the candidates seen so far, in buf[0, count).
struct Selector {
  Cand* buf;
  int64_t cap;    // buffer capacity (> k, or == block length when every element fits)
  int64_t k;
  int64_t count = 0;
  float threshold = -kInf;  // admit only scores > threshold

  void shrink() {
    std::nth_element(buf, buf + (k - 1), buf + count, better);
    count = k;
    // Later elements of this block have higher ids, so a score equal to the k-th best loses.
    threshold = buf[k - 1].value;
  }

  FASTSAFE_INLINE void push(float v, int32_t id) {
    buf[count++] = Cand{v, id};
    if (count == cap && cap > k) shrink();
  }
};

FASTSAFE_CLONES
int64_t first_chunk_above(const float* __restrict s, int64_t n, int64_t start, float threshold) {
  // Index of the first kLanes-chunk at or after `start` with an element > threshold (or n).
  const int64_t body = n - n % kLanes;
  for (int64_t i = start; i < body; i += kLanes) {
    uint32_t any = 0;
#pragma omp simd reduction(| : any)
    for (int j = 0; j < kLanes; ++j) any |= static_cast<uint32_t>(s[i + j] > threshold);
    if (any != 0) return i;
  }
  return body;
}

void block_select(const float* s, int64_t n, int32_t id0, Selector& sel) {
  const int64_t body = n - n % kLanes;
  int64_t i = 0;
  while (i < body) {
    i = first_chunk_above(s, n, i, sel.threshold);
    if (i >= body) break;
    for (int j = 0; j < kLanes; ++j) {
      const float x = s[i + j];
      if (x > sel.threshold) sel.push(x, id0 + static_cast<int32_t>(i + j));
    }
    i += kLanes;
  }
  for (int64_t t = body; t < n; ++t) {
    if (s[t] > sel.threshold) sel.push(s[t], id0 + static_cast<int32_t>(t));
  }
}

// ---- per-row merge ------------------------------------------------------------------------

float merge_lse(const BlockStats* stats, int64_t nblocks) {
  bool nan = false;
  float m = -kInf;
  for (int64_t j = 0; j < nblocks; ++j) {
    nan = nan || stats[j].nan;
    m = stats[j].max > m ? stats[j].max : m;
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (m == kInf) return kInf;
  if (m == -kInf) return -kInf;
  double total = 0.0;
  for (int64_t j = 0; j < nblocks; ++j) {
    if (stats[j].max > -kInf) {
      total += static_cast<double>(stats[j].sum) * std::exp(static_cast<double>(stats[j].max) - m);
    }
  }
  return static_cast<float>(static_cast<double>(m) + std::log(total));
}

void merge_topk(Cand* cands, int64_t total, int64_t k, float* values, int64_t* indices,
                std::vector<int32_t>& chosen) {
  const int64_t take = std::min(total, k);
  if (total > k) std::nth_element(cands, cands + (k - 1), cands + total, better);
  std::sort(cands, cands + take, better);
  for (int64_t i = 0; i < take; ++i) {
    values[i] = cands[i].value;
    indices[i] = cands[i].id;
  }
  if (take == k) return;
  // Fewer than k real scores: the tail is -inf with the lowest ids not already chosen.
  chosen.resize(static_cast<size_t>(take));
  for (int64_t i = 0; i < take; ++i) chosen[i] = cands[i].id;
  std::sort(chosen.begin(), chosen.end());
  int64_t next = 0;
  size_t c = 0;
  for (int64_t i = take; i < k; ++i) {
    while (c < chosen.size() && chosen[c] == next) {
      ++next;
      ++c;
    }
    values[i] = -kInf;
    indices[i] = next++;
  }
}

}  // namespace

void safe_topk_cpu(const SafeTopKArgs& a, int num_threads) {
  const int64_t B = a.batch, V = a.vocab, k = a.k;
  if (B <= 0 || V <= 0 || k <= 0) return;
  const int threads = num_threads < 1 ? 1 : num_threads;
  const int64_t nblocks = (V + kCpuBlock - 1) / kCpuBlock;
  // A task is a segment of consecutive blocks of one row; its selector (and threshold) carries
  // over from block to block. Enough segments per row to keep every thread busy when B is
  // small. The segmentation changes only the work split: the top k is unique (ties by id) and
  // the logsumexp is merged from per-block partials in block order, so results do not depend
  // on the thread count.
  const int64_t want = (4 * static_cast<int64_t>(threads) + B - 1) / B;
  const int64_t seg_blocks = (nblocks + std::min(want, nblocks) - 1) / std::min(want, nblocks);
  const int64_t nseg = (nblocks + seg_blocks - 1) / seg_blocks;
  const int64_t ntasks = B * nseg;
  const int64_t seg_len = seg_blocks * kCpuBlock;
  const int64_t slot = std::min(k, seg_len);                 // candidates kept per task
  const int64_t cap = std::min(2 * k + 64, seg_len);         // selection buffer per thread
  const int64_t words = bitmask_words(V);
  const int64_t elem = a.dtype == ScalarKind::Float32 ? 4 : 2;

  std::vector<Cand> slots(static_cast<size_t>(ntasks * slot));
  std::vector<int64_t> counts(static_cast<size_t>(ntasks), 0);
  std::vector<BlockStats> stats(static_cast<size_t>(B * nblocks));

#pragma omp parallel num_threads(threads) if (threads > 1 && ntasks > 1)
  {
    alignas(64) float scores[kCpuBlock];
    std::vector<Cand> buf(static_cast<size_t>(cap));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t b = task / nseg;
      const int64_t first_blk = (task % nseg) * seg_blocks;
      const int64_t end_blk = std::min(nblocks, first_blk + seg_blocks);

      RowInputs row;
      row.logits = static_cast<const char*>(a.logits) + b * a.logits_row_stride * elem;
      row.bias = nullptr;
      if (a.bias_table != nullptr) {
        int64_t pos = a.positions != nullptr ? a.positions[b] : 0;
        pos = std::min(std::max<int64_t>(pos, 0), a.bias_rows - 1);
        row.bias = a.bias_table + pos * V;
      }
      row.reward = a.dense_reward == nullptr
                       ? nullptr
                       : static_cast<const char*>(a.dense_reward) + b * a.reward_row_stride * elem;
      row.mask = a.bitmask == nullptr
                     ? nullptr
                     : reinterpret_cast<const uint32_t*>(a.bitmask) + (a.bitmask_rows == 1 ? 0 : b * words);

      Selector sel{buf.data(), cap, k};
      for (int64_t blk = first_blk; blk < end_blk; ++blk) {
        const int64_t v0 = blk * kCpuBlock;
        const int64_t n = std::min(kCpuBlock, V - v0);
        block_scores(row, a.dtype, v0, n, a.temperature, a.bias_scale, a.reward_weight, scores);
        BlockStats st;
        block_max(scores, n, &st.max, &st.nan);
        if (st.max > -kInf && st.max < kInf) st.sum = block_sumexp(scores, n, st.max);
        stats[b * nblocks + blk] = st;
        // A block without a real score (all banned) costs nothing more.
        if (st.max > sel.threshold) block_select(scores, n, static_cast<int32_t>(v0), sel);
      }
      if (sel.count > k) sel.shrink();
      std::copy(buf.data(), buf.data() + sel.count, slots.data() + task * slot);
      counts[task] = sel.count;
    }

    std::vector<Cand> row_cands;
    std::vector<int32_t> chosen;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      a.lse[b] = merge_lse(stats.data() + b * nblocks, nblocks);
      const int64_t first = b * nseg;
      int64_t total = 0;
      for (int64_t j = 0; j < nseg; ++j) total += counts[first + j];
      row_cands.resize(static_cast<size_t>(total));
      int64_t at = 0;
      for (int64_t j = 0; j < nseg; ++j) {
        const Cand* src = slots.data() + (first + j) * slot;
        std::copy(src, src + counts[first + j], row_cands.data() + at);
        at += counts[first + j];
      }
      merge_topk(row_cands.data(), total, k, a.values + b * k, a.indices + b * k, chosen);
    }
  }
}

}  // namespace fastsafe
