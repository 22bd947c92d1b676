// C++ CPU kernel of `safe_topk`: one pass over the logits, OpenMP over rows and segments of
// blocks of V.
//
// A task is a segment of consecutive blocks (kCpuBlock tokens) of one row. For each block:
//   1. scores into a small float buffer (16-wide vector loops, safe_topk_cpu_blocks.h: dtype
//      conversion, / temperature, - bias_scale * bias, + reward_weight * reward, bitmask),
//      padded with -inf to whole selection groups, and the block max as they are stored;
//   2. the sum of exp(score - max) (vector expf), NaN iff some score is NaN;
//   3. a k-best selection: a candidate buffer behind a threshold that carries over from block
//      to block; step 1 flags the groups of 64 scores with some score above it, and in a
//      flagged group only those are visited (a bit mask); when the buffer holds
//      2k + 64 candidates it is cut back to the k best (nth_element) and the threshold rises.
// While step 2 runs, the inputs of the segment's next block are prefetched.
// Then per row: the blocks' (max, sum) pairs merge into the logsumexp, and the segments'
// candidates into the sorted top k; -inf slots take the lowest ids not chosen.
//
// Only finite or +inf scores are candidates (NaN and -inf count as -inf, never selected
// ahead of a real score). Blocks are fixed and their partial sums merged in block order, and
// the top k (ties by lower id) is unique, so results do not depend on the thread count.
#include "safe_topk_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define FASTSAFE_INLINE inline __attribute__((always_inline))

namespace fastsafe {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kGroup = 64;  // selection: scores tested together against the threshold
static_assert(kCpuBlock % kGroup == 0, "blocks hold whole selection groups");
static_assert(kGroup == 64, "group_mask returns one 64-bit mask per group");
static_assert(kCpuBlock / kGroup <= 64, "block_scores flags a block's groups in one 64-bit mask");

struct RowInputs {
  const void* logits;      // row start
  const float* bias;       // row of the table, or null
  const void* reward;      // row start, or null
  const uint32_t* mask;    // row of words, or null
};

// Inputs of the next block, prefetched a little at a time while a compute-bound loop of the
// current block runs (the block's own loads then mostly hit the cache). Step i (of
// kCpuBlock / 32) touches the bytes of tokens [32 i, 32 i + 32) of each stream.
struct Prefetch {
  const char* stream[3] = {nullptr, nullptr, nullptr};
  int64_t step[3] = {0, 0, 0};  // bytes per 32 tokens: 128 (float32) or 64 (16-bit)

  FASTSAFE_INLINE void issue(int64_t i) const {
    for (int s = 0; s < 3; ++s) {
      if (stream[s] == nullptr) continue;
      const char* p = stream[s] + i * step[s];
      __builtin_prefetch(p, 0, 3);
      if (step[s] > 64) __builtin_prefetch(p + 64, 0, 3);
    }
  }
};

enum class ScaleMode { Copy, Multiply, Divide };

struct ScoreParams {
  ScaleMode mode;
  float temperature;
  float inv;  // 1 / temperature, used only when exact (ScaleMode::Multiply)
  float bias_scale;
  float reward_weight;
};

// x / t is computed as a division (bitwise what torch computes on the CPU), except where a
// multiply gives the same correctly rounded result: t == 1 (nothing to do) or t a power of
// two (its reciprocal is exact; both round the same real number).
ScoreParams score_params(const SafeTopKArgs& a) {
  ScoreParams sp{ScaleMode::Divide, a.temperature, 1.0f / a.temperature, a.bias_scale, a.reward_weight};
  int e = 0;
  const float mant = std::frexp(a.temperature, &e);
  if (a.temperature == 1.0f) {
    sp.mode = ScaleMode::Copy;
  } else if (mant == 0.5f && e > -125 && e < 126) {
    sp.mode = ScaleMode::Multiply;
  }
  return sp;
}

// The per-block vector loops, one set per instruction set (see safe_topk_cpu_blocks.h).
struct BlockKernels {
  uint64_t (*scores)(const RowInputs&, ScalarKind, int64_t, int64_t, const ScoreParams&, float, float*, float*);
  float (*sumexp)(const float*, int64_t, float, const Prefetch&);
  uint64_t (*group_mask)(const float*, float);
  const char* isa;
};

// The vector types are only used inside always-inline helpers and the ISA's own functions, so
// GCC's note that passing them by value would depend on the ISA does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace isa_base {
#define FASTSAFE_TARGET
#define FASTSAFE_ISA_NAME "baseline"
#define FASTSAFE_VLEN 4
#include "safe_topk_cpu_blocks.h"
#undef FASTSAFE_VLEN
#undef FASTSAFE_ISA_NAME
#undef FASTSAFE_TARGET
}  // namespace isa_base

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSAFE_X86_VERSIONS 1
namespace isa_avx2 {
#define FASTSAFE_TARGET __attribute__((target("avx2")))
#define FASTSAFE_ISA_NAME "avx2"
#define FASTSAFE_VLEN 8
#include "safe_topk_cpu_blocks.h"
#undef FASTSAFE_VLEN
#undef FASTSAFE_ISA_NAME
#undef FASTSAFE_TARGET
}  // namespace isa_avx2
namespace isa_avx512 {
#define FASTSAFE_TARGET __attribute__((target("avx512f")))
#define FASTSAFE_ISA_NAME "avx512f"
#define FASTSAFE_VLEN 16
#include "safe_topk_cpu_blocks.h"
#undef FASTSAFE_VLEN
#undef FASTSAFE_ISA_NAME
#undef FASTSAFE_TARGET
}  // namespace isa_avx512
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// The best set this CPU runs; FASTSAFE_CPU_ISA=baseline|avx2|avx512f caps it (for tests and
// comparisons; every set gives bitwise identical results).
const BlockKernels& block_kernels() {
  const char* want = std::getenv("FASTSAFE_CPU_ISA");
  const std::string cap = want != nullptr ? want : "";
#ifdef FASTSAFE_X86_VERSIONS
  __builtin_cpu_init();
  if (cap != "baseline" && cap != "avx2" && __builtin_cpu_supports("avx512f")) return isa_avx512::kBlockKernels;
  if (cap != "baseline" && __builtin_cpu_supports("avx2")) return isa_avx2::kBlockKernels;
#endif
  (void)cap;
  return isa_base::kBlockKernels;
}

// ---- per-block statistics ----------------------------------------------------------------

struct BlockStats {
  float max = -kInf;  // max over non-NaN scores (may be +inf)
  float sum = 0.0f;   // sum of exp(score - max) when max is finite
  bool nan = false;   // some score is NaN
};

bool any_nan(const float* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(s[i])) return true;
  }
  return false;
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

// Offers the scores of block s to the selector: only the groups flagged in `groups` (those
// with a score above the threshold the block started with; it only rises) are looked at.
void block_select(const BlockKernels& K, const float* s, uint64_t groups, int32_t id0, Selector& sel) {
  for (; groups != 0; groups &= groups - 1) {
    const int64_t i = static_cast<int64_t>(__builtin_ctzll(groups)) * kGroup;
    for (uint64_t hits = K.group_mask(s + i, sel.threshold); hits != 0; hits &= hits - 1) {
      const int j = __builtin_ctzll(hits);
      const float x = s[i + j];
      if (x > sel.threshold) sel.push(x, id0 + static_cast<int32_t>(i + j));  // the threshold may have risen
    }
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
  const ScoreParams sp = score_params(a);
  const BlockKernels& K = block_kernels();

  std::vector<Cand> slots(static_cast<size_t>(ntasks * slot));
  std::vector<int64_t> counts(static_cast<size_t>(ntasks), 0);
  std::vector<BlockStats> stats(static_cast<size_t>(B * nblocks));
  std::unique_ptr<std::atomic<int64_t>[]> segments_left(new std::atomic<int64_t>[static_cast<size_t>(B)]);
  for (int64_t b = 0; b < B; ++b) segments_left[b].store(nseg, std::memory_order_relaxed);

#pragma omp parallel num_threads(threads) if (threads > 1 && ntasks > 1)
  {
    alignas(64) float buffer[kCpuBlock];
    std::vector<Cand> buf(static_cast<size_t>(cap));
    std::vector<Cand> row_cands;
    std::vector<int32_t> chosen;
    // Per row: the logsumexp from the per-block partials (in block order), the top k from the
    // segments' candidates.
    auto merge_row = [&](int64_t b) {
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
    };
#pragma omp for schedule(dynamic, 1) nowait
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
        BlockStats st;
        const uint64_t groups = K.scores(row, a.dtype, v0, n, sp, sel.threshold, buffer, &st.max);
        const int64_t padded = (n + kGroup - 1) / kGroup * kGroup;  // -inf after n
        // The next block's inputs (whole blocks only: a partial last block is not read ahead).
        Prefetch next;
        const int64_t v1 = v0 + kCpuBlock;
        if (blk + 1 < end_blk && v1 + kCpuBlock <= V) {
          next.stream[0] = static_cast<const char*>(row.logits) + v1 * elem;
          next.step[0] = 32 * elem;
          if (row.bias != nullptr) {
            next.stream[1] = reinterpret_cast<const char*>(row.bias + v1);
            next.step[1] = 128;
          }
          if (row.reward != nullptr) {
            next.stream[2] = static_cast<const char*>(row.reward) + v1 * elem;
            next.step[2] = 32 * elem;
          }
        }
        if (st.max > -kInf && st.max < kInf) {
          st.sum = K.sumexp(buffer, padded, st.max, next);
          st.nan = std::isnan(st.sum);  // a NaN score makes the sum NaN
        } else {
          st.nan = any_nan(buffer, padded);  // rare: all -inf/NaN, or a +inf score
        }
        stats[b * nblocks + blk] = st;
        // Only flagged groups are visited: a block with no score above the threshold (e.g. all
        // banned) costs nothing more.
        block_select(K, buffer, groups, static_cast<int32_t>(v0), sel);
      }
      if (sel.count > k) sel.shrink();
      std::copy(buf.data(), buf.data() + sel.count, slots.data() + task * slot);
      counts[task] = sel.count;
      // The thread finishing a row's last segment merges the row (one barrier in all, which
      // matters when a busy machine deschedules a thread).
      if (segments_left[b].fetch_sub(1, std::memory_order_acq_rel) == 1) merge_row(b);
    }
  }
}

const char* safe_topk_cpu_isa() { return block_kernels().isa; }

}  // namespace fastsafe
