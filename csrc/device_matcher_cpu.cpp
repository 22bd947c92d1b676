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

void matcher_advance_cpu(const MatcherTables& t, const int64_t* state, int64_t width, const int64_t* tokens,
                         int64_t batch, int64_t* out, int threads) {
  const int n = batch < kSerialRows ? 1 : threads;
#pragma omp parallel for num_threads(n) schedule(static) if (n > 1)
  for (int64_t b = 0; b < batch; ++b) {
    advance_row(t, state + b * width, out + b * width, width, tokens[b]);
  }
}

void matcher_banned_bitmask_cpu(const MatcherTables& t, const int64_t* state, int64_t width, int64_t batch,
                                int32_t* words, int threads) {
  const int n = batch < kSerialRows ? 1 : threads;
  const int64_t W = t.words;
#pragma omp parallel for num_threads(n) schedule(static) if (n > 1)
  for (int64_t b = 0; b < batch; ++b) {
    int32_t* row = words + b * W;
    std::memcpy(row, t.base, static_cast<size_t>(W) * sizeof(int32_t));
    const int64_t s = clamp64(state[b * width + kStTok], 0, t.tok_states - 1);
    apply_bans(t, s, row);
  }
}

void matcher_check_candidates_cpu(const MatcherTables& t, const int64_t* state, int64_t width, const int64_t* cand,
                                  int64_t batch, int64_t k, bool* ok, int32_t* entity, int threads) {
  const int64_t n_items = batch * k;
  const int n = n_items < kSerialCandidates ? 1 : threads;
#pragma omp parallel for num_threads(n) schedule(static) if (n > 1)
  for (int64_t i = 0; i < n_items; ++i) {
    check_one(t, state + (i / k) * width, cand[i], ok + i, entity + i);
  }
}

}  // namespace fastsafe
