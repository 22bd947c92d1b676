// C++ CPU kernels of the device matcher's step (see device_matcher_step.h for the per-row work).
#pragma once

#include <cstdint>

#include "device_matcher_step.h"

namespace fastsafe {

// The fields of `call` each op uses are listed at MatcherCall; `threads`: OpenMP threads at most.
void matcher_advance_cpu(const MatcherTables& t, const MatcherCall& call, int threads);
void matcher_banned_bitmask_cpu(const MatcherTables& t, const MatcherCall& call, int threads);
void matcher_check_candidates_cpu(const MatcherTables& t, const MatcherCall& call, int threads);

}  // namespace fastsafe
