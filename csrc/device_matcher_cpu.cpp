// C++ CPU kernels of the device matcher's step: OpenMP over rows (advance, banned_bitmask) or
// over (row, candidate) pairs (check_candidates); each item is the shared per-row code of
// device_matcher_step.h. Small batches stay on one thread (a parallel region costs more than
// the work).
#include "device_matcher_cpu.h"

#include <cstring>

namespace fastsafe {

namespace {
// Items below which a call stays serial.
constexpr int64_t kSerialRows = 64;
constexpr int64_t kSerialCandidates = 512;
}  // namespace

void matcher_advance_cpu(const MatcherTables& t, const MatcherCall& c, int threads) {
  const int n = c.batch < kSerialRows ? 1 : threads;
#pragma omp parallel for num_threads(n) schedule(static) if (n > 1)
  for (int64_t b = 0; b < c.batch; ++b) {
    advance_row(t, c.state + b * c.width, c.out_state + b * c.width, c.width, c.ids[b]);
  }
}

void matcher_banned_bitmask_cpu(const MatcherTables& t, const MatcherCall& c, int threads) {
  const int n = c.batch < kSerialRows ? 1 : threads;
  const int64_t W = t.words;
#pragma omp parallel for num_threads(n) schedule(static) if (n > 1)
  for (int64_t b = 0; b < c.batch; ++b) {
    int32_t* row = c.words + b * W;
    std::memcpy(row, t.base, static_cast<size_t>(W) * sizeof(int32_t));
    const int64_t s = clamp64(c.state[b * c.width + kStTok], 0, t.tok_states - 1);
    apply_bans(t, s, row);
  }
}

void matcher_check_candidates_cpu(const MatcherTables& t, const MatcherCall& c, int threads) {
  const int64_t n_items = c.batch * c.k;
  const int n = n_items < kSerialCandidates ? 1 : threads;
#pragma omp parallel for num_threads(n) schedule(static) if (n > 1)
  for (int64_t i = 0; i < n_items; ++i) {
    check_one(t, c.state + (i / c.k) * c.width, c.ids[i], c.ok + i, c.entity + i);
  }
}

}  // namespace fastsafe
