// Per-block vector loops of the CPU kernel (safe_topk_cpu.cpp), written with GCC/Clang vector
// extensions so they vectorise whatever the auto-vectoriser decides.
//
// Included once per instruction set, inside its own namespace, with FASTSAFE_TARGET defined
// as the target attribute (e.g. __attribute__((target("avx2"))), or nothing for the baseline)
// and FASTSAFE_VLEN as the native number of floats per vector (16, 8, 4; a power of two
// dividing 32): no include guard on purpose. safe_topk_cpu.cpp picks one set at run time. The arithmetic is
// plain IEEE single precision with no contraction (-ffp-contract=off), so every set returns
// bitwise identical results.
//
// Expects (from the includer): <cstdint>, <cstring>, <limits>, fastsafe::ScalarKind,
// RowInputs, ScoreParams, ScaleMode, Prefetch, kGroup, kInf.

constexpr int kV = FASTSAFE_VLEN;
typedef float f32v __attribute__((vector_size(4 * FASTSAFE_VLEN)));
typedef int32_t i32v __attribute__((vector_size(4 * FASTSAFE_VLEN)));
typedef uint32_t u32v __attribute__((vector_size(4 * FASTSAFE_VLEN)));
typedef uint16_t u16v __attribute__((vector_size(2 * FASTSAFE_VLEN)));
static_assert(32 % kV == 0 && kGroup % kV == 0, "a vector of tokens shares one bitmask word");

#define FASTSAFE_VEC FASTSAFE_TARGET inline __attribute__((always_inline))

FASTSAFE_VEC f32v splat(float x) {
  f32v v = {};
  return v + x;
}

FASTSAFE_VEC u32v splat_u(uint32_t x) {
  u32v v = {};
  return v + x;
}

FASTSAFE_VEC f32v loadv(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

FASTSAFE_VEC void storev(float* p, f32v v) { std::memcpy(p, &v, sizeof v); }

FASTSAFE_VEC u32v widenv(const uint16_t* p) {
  u16v h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32v);
}

FASTSAFE_VEC f32v bf16v_to_float(u32v w) { return (f32v)(w << 16); }

// Per-lane helpers with one instruction where the set has it (x86: the vector compare's bit
// mask and maxps); the generic forms compute the same results.
#if defined(__x86_64__) && FASTSAFE_VLEN == 16
FASTSAFE_VEC uint32_t gt_bits(f32v x, f32v t) { return _mm512_cmp_ps_mask((__m512)x, (__m512)t, _CMP_GT_OQ); }
FASTSAFE_VEC f32v maxv(f32v a, f32v b) { return (f32v)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__x86_64__) && FASTSAFE_VLEN == 8
FASTSAFE_VEC uint32_t gt_bits(f32v x, f32v t) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps((__m256)x, (__m256)t, _CMP_GT_OQ)));
}
FASTSAFE_VEC f32v maxv(f32v a, f32v b) { return (f32v)_mm256_max_ps((__m256)a, (__m256)b); }
#elif defined(__x86_64__) && FASTSAFE_VLEN == 4
FASTSAFE_VEC uint32_t gt_bits(f32v x, f32v t) {
  return static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpgt_ps((__m128)x, (__m128)t)));
}
FASTSAFE_VEC f32v maxv(f32v a, f32v b) { return (f32v)_mm_max_ps((__m128)a, (__m128)b); }
#else
// Bit j set iff x[j] > t[j] (false for NaN).
FASTSAFE_VEC uint32_t gt_bits(f32v x, f32v t) {
  uint32_t bits = 0;
  for (int j = 0; j < kV; ++j) bits |= static_cast<uint32_t>(x[j] > t[j]) << j;
  return bits;
}
// a > b ? a : b per lane (b when either is NaN), as x86's maxps.
FASTSAFE_VEC f32v maxv(f32v a, f32v b) { return (a > b) ? a : b; }
#endif

// x where bit j of `bits` is set, -inf elsewhere (lane j; lane_bit[j] = 1 << j).
#if defined(__x86_64__) && FASTSAFE_VLEN == 16
FASTSAFE_VEC f32v keep_allowed(f32v x, uint32_t bits, u32v) {
  return (f32v)_mm512_mask_blend_ps(static_cast<__mmask16>(bits), (__m512)splat(-kInf), (__m512)x);
}
#else
FASTSAFE_VEC f32v keep_allowed(f32v x, uint32_t bits, u32v lane_bit) {
  return ((splat_u(bits) & lane_bit) != 0u) ? x : splat(-kInf);
}
#endif

// IEEE half -> float, exact for every input: the exponent is re-biased by a multiply with
// 2^112 (which also turns half subnormals into floats exactly); inf/NaN keep their payload.
FASTSAFE_VEC f32v halfv_to_float(u32v w) {
  const u32v sign = (w & 0x8000u) << 16;
  const u32v em = w & 0x7fffu;
  const u32v shifted = em << 13;
  u32v bits = (u32v)((f32v)shifted * 0x1p112f);
  bits = (em >= 0x7c00u) ? (shifted | 0x7f800000u) : bits;
  return (f32v)(bits | sign);
}

// kV elements of the given kind starting at element i of base (all must exist).
template <int kKind>
FASTSAFE_VEC f32v load_kind(const void* base, int64_t i) {
  if (kKind == 0) return loadv(static_cast<const float*>(base) + i);
  const u32v w = widenv(static_cast<const uint16_t*>(base) + i);
  return kKind == 1 ? halfv_to_float(w) : bf16v_to_float(w);
}

// The first `valid` (< kV) elements, zero-padded: never reads past the row.
template <int kKind>
FASTSAFE_VEC f32v load_kind_partial(const void* base, int64_t i, int valid) {
  alignas(64) unsigned char tmp[4 * kV] = {};
  const int bytes = kKind == 0 ? 4 : 2;
  std::memcpy(tmp, static_cast<const unsigned char*>(base) + i * bytes, static_cast<size_t>(valid) * bytes);
  return load_kind<kKind>(tmp, 0);
}

FASTSAFE_VEC f32v load_f32_partial(const float* p, int valid) {
  alignas(64) float tmp[kV] = {};
  std::memcpy(tmp, p, static_cast<size_t>(valid) * sizeof(float));
  return loadv(tmp);
}

// Scores of the kV tokens from v0 + i (lanes >= valid give -inf). lane_bit[j] = 1 << j.
template <int kKind>
FASTSAFE_VEC f32v scorev(const RowInputs& row, int64_t v0, int64_t i, int valid, const ScoreParams& sp,
                         u32v lane_bit) {
  const int64_t v = v0 + i;
  f32v x = valid == kV ? load_kind<kKind>(row.logits, v) : load_kind_partial<kKind>(row.logits, v, valid);
  if (sp.mode == ScaleMode::Multiply) {
    x = x * sp.inv;
  } else if (sp.mode == ScaleMode::Divide) {
    x = x / sp.temperature;
  }
  if (row.bias != nullptr) {
    const f32v b = valid == kV ? loadv(row.bias + v) : load_f32_partial(row.bias + v, valid);
    x = x - sp.bias_scale * b;
  }
  if (row.reward != nullptr) {
    const f32v r =
        valid == kV ? load_kind<kKind>(row.reward, v) : load_kind_partial<kKind>(row.reward, v, valid);
    x = x + sp.reward_weight * r;
  }
  if (row.mask != nullptr) {
    // v is a multiple of kV, so the kV bits sit in one word, from bit v % 32.
    x = keep_allowed(x, row.mask[v >> 5] >> static_cast<uint32_t>(v & 31), lane_bit);
  }
  if (valid < kV) x = ((lane_bit >> static_cast<uint32_t>(valid)) == 0u) ? x : splat(-kInf);  // lane j < valid
  return x;
}

template <int kKind>
FASTSAFE_VEC uint64_t block_scores_kind(const RowInputs& row, int64_t v0, int64_t n, const ScoreParams& sp,
                                        float threshold, float* __restrict out, float* max_out) {
  u32v lane_bit;
  for (int j = 0; j < kV; ++j) lane_bit[j] = 1u << j;
  const f32v t = splat(threshold);
  f32v m = splat(-kInf);
  uint64_t groups = 0;
  const int64_t full = n - n % kV;
  for (int64_t i = 0; i < full; i += kV) {
    const f32v x = scorev<kKind>(row, v0, i, kV, sp, lane_bit);
    storev(out + i, x);
    m = maxv(x, m);  // a NaN never wins
    groups |= static_cast<uint64_t>(gt_bits(x, t) != 0) << (i / kGroup);
  }
  int64_t end = full;
  if (full < n) {
    const f32v x = scorev<kKind>(row, v0, full, static_cast<int>(n - full), sp, lane_bit);
    storev(out + full, x);
    m = maxv(x, m);
    groups |= static_cast<uint64_t>(gt_bits(x, t) != 0) << (full / kGroup);
    end += kV;
  }
  for (; end % kGroup != 0; end += kV) storev(out + end, splat(-kInf));
  float best = -kInf;
  for (int j = 0; j < kV; ++j) best = m[j] > best ? m[j] : best;
  *max_out = best;
  return groups;
}

// Scores of tokens [v0, v0 + n) of one row into out[0, n), then -inf up to a multiple of
// kGroup (out holds kCpuBlock floats, v0 is a multiple of 32); also their max over the
// non-NaN scores (NaN is found by the caller: see block_sumexp). Returns bit g set iff group
// g (scores [64 g, 64 g + 64)) has a score > threshold.
FASTSAFE_TARGET uint64_t block_scores(const RowInputs& row, ScalarKind dtype, int64_t v0, int64_t n,
                                      const ScoreParams& sp, float threshold, float* __restrict out,
                                      float* max_out) {
  if (dtype == ScalarKind::Float32) return block_scores_kind<0>(row, v0, n, sp, threshold, out, max_out);
  if (dtype == ScalarKind::Float16) return block_scores_kind<1>(row, v0, n, sp, threshold, out, max_out);
  return block_scores_kind<2>(row, v0, n, sp, threshold, out, max_out);
}

// 2^(i/16), i = 0..15, each correctly rounded to float.
alignas(64) constexpr float kExp2Sixteenths[16] = {
    0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f, 0x1.306fe0p+0f, 0x1.3dea64p+0f,
    0x1.4bfdaep+0f, 0x1.5ab07ep+0f, 0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
    0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f};

// kExp2Sixteenths[j & 15] per lane.
#if defined(__x86_64__) && FASTSAFE_VLEN == 16
FASTSAFE_VEC f32v exp2_sixteenths(i32v j) {
  return (f32v)_mm512_permutexvar_ps((__m512i)j, (__m512)loadv(kExp2Sixteenths));
}
#elif defined(__x86_64__) && FASTSAFE_VLEN == 8
FASTSAFE_VEC f32v exp2_sixteenths(i32v j) {
  const __m256 lo = _mm256_permutevar8x32_ps((__m256)loadv(kExp2Sixteenths), (__m256i)j);
  const __m256 hi = _mm256_permutevar8x32_ps((__m256)loadv(kExp2Sixteenths + 8), (__m256i)j);
  return (f32v)_mm256_blendv_ps(lo, hi, (__m256)(j << 28));  // bit 3 of j picks the half
}
#else
FASTSAFE_VEC f32v exp2_sixteenths(i32v j) {
  f32v r;
  for (int l = 0; l < kV; ++l) r[l] = kExp2Sixteenths[j[l] & 15];
  return r;
}
#endif

// exp(x) for x <= 0 (score - max), per lane: exp(x) = 2^(t/16) with t = x 16 log2(e) rounded
// once (a relative error of about 4e-8 |x|: under 1e-6 for every term above e^-17 of the
// max), j = round(t), f = t - j in [-1/2, 1/2] exactly; 2^(j/16) = 2^(j >> 4) 2^((j & 15)/16)
// from a 16-entry table with the power of two added in the exponent field, and 2^(f/16) by
// its degree-3 Taylor polynomial (truncation error 1e-8; about 2e-7 in all for x > -1,
// evaluated in float32). t is clamped at -2016 (2^-126), so inputs below ~-87.3 (including
// -inf) give ~FLT_MIN instead of ~0: in a sum that holds exp(0) = 1 (the block max) even
// 2^31 of them change nothing. NaN gives NaN (so a sum with a NaN term is NaN).
FASTSAFE_VEC f32v expv(f32v x) {
  const float kScale = 23.0831206542234f;  // 16 log2(e)
  const float kRound = 12582912.0f;        // 1.5 * 2^23: adding it rounds to an integer
  f32v t = x * kScale;
  t = maxv(splat(-2016.0f), t);  // NaN stays NaN
  const f32v shifted = t + kRound;
  const f32v n = shifted - kRound;
  const i32v j = (i32v)shifted - 0x4B400000;  // round(t) as two's complement
  const f32v f = t - n;
  f32v p = splat(1.3550808e-05f);  // (ln 2 / 16)^3 / 6
  p = p * f + 9.3838479e-04f;      // (ln 2 / 16)^2 / 2
  p = p * f + 4.3321699e-02f;      // ln 2 / 16
  p = p * f + 1.0f;
  const u32v scale = (u32v)exp2_sixteenths(j) + ((u32v)(j >> 4) << 23);
  return p * (f32v)scale;
}

// Sum of exp(s - m) over s[0, n) (n a multiple of kGroup; -inf entries add ~0; NaN when
// some s is NaN). Element i
// goes to accumulator lane i % 32 whatever the vector width, and the 32 lanes are added in
// order, so every instruction set rounds identically.
// While it runs, the inputs of the caller's next block are prefetched (`next`), so their
// loads from memory overlap this compute-bound loop.
FASTSAFE_TARGET float block_sumexp(const float* __restrict s, int64_t n, float m, const Prefetch& next) {
  constexpr int kAcc = 32 / kV;
  f32v acc[kAcc] = {};
  for (int64_t i = 0; i < n; i += 32) {
    for (int c = 0; c < kAcc; ++c) acc[c] += expv(loadv(s + i + c * kV) - m);
    next.issue(i / 32);
  }
  double total = 0.0;
  for (int c = 0; c < kAcc; ++c) {
    for (int j = 0; j < kV; ++j) total += static_cast<double>(acc[c][j]);
  }
  return static_cast<float>(total);
}

// Bit j set iff s[j] > threshold, for the kGroup (64) scores of one group.
FASTSAFE_TARGET uint64_t group_mask(const float* __restrict s, float threshold) {
  const f32v t = splat(threshold);
  uint64_t mask = 0;
  for (int c = 0; c < kGroup; c += kV) mask |= static_cast<uint64_t>(gt_bits(loadv(s + c), t)) << c;
  return mask;
}

constexpr BlockKernels kBlockKernels = {block_scores, block_sumexp, group_mask, FASTSAFE_ISA_NAME};

#undef FASTSAFE_VEC
