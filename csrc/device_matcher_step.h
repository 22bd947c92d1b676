// The per-row work of the device matcher (fastsafe/safety/device_matcher.py), shared by the C++
// CPU kernel (device_matcher_cpu.cpp) and the CUDA kernel (device_matcher_cuda.cu): one token
// through the token automaton, the packed ban mask of a state, and one token through the
// character automaton (the text check). Raw pointers only (no torch headers), so the CUDA file
// compile-checks with plain nvcc.
//
// The plain-PyTorch reference is DeviceMatcher's tensor program (_token_step, banned_bitmask,
// _char_step, _text_run); these functions follow it line by line, with early exits where the
// reference runs a fixed number of masked steps (the results are the same):
//   * the token step stops at the first hit on the failure chain (the reference tries all
//     chain_depth nodes and keeps the first hit);
//   * a token's character slots end at the first empty slot (an empty slot changes nothing);
//   * the ban chain stops at its end (-1).
// Table contents are trusted (DeviceMatcher builds them); the state and token ids are not: ids
// outside [0, V) read the empty row V, and every state column is clamped into its range before
// it is used as an index (sanitize_state), so no input makes a kernel read out of bounds.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTSAFE_HD __host__ __device__ __forceinline__
#else
#define FASTSAFE_HD inline
#endif

namespace fastsafe {

// Columns of the state (DeviceMatcher.STATE_WIDTH >= 7 is the row stride; columns past 6 belong
// to other parts of the matcher and are copied through by advance).
constexpr int kStTok = 0, kStChr = 1, kStCtx = 2, kStCp = 3, kStNeed = 4, kStShadow = 5, kStPend = 6;
constexpr int kMatcherStateColumns = 7;
// Pending spelled-out match: -1 or entity * 4 + 2 * new + level2 (values below 2^33).
constexpr int64_t kPendLimit = int64_t{1} << 33;
// Special character classes (fastsafe/safety/char_automaton.py) and the action flags.
constexpr int32_t kOtherNonword = 0, kBnd = 3, kSq2 = 4, kSq3 = 5, kSq4 = 7;
constexpr int32_t kFlagBnd = 1, kFlagConfirm = 4, kFlagWord = 8, kFlagSeparator = 16;
constexpr int64_t kCpLimit = 0x30000;

struct MatcherTables {
  int64_t vocab = 0;          // V
  int64_t words = 0;          // W = ceil(V / 32)
  // ---- token level
  const int64_t* goto_keys = nullptr;   // [n_goto] sorted state * V + token
  const int32_t* goto_next = nullptr;   // [n_goto]
  int64_t n_goto = 0;
  const int32_t* chain_next = nullptr;  // [tok_states]
  const int32_t* ban_first = nullptr;   // [tok_states] banning node or -1
  int64_t tok_states = 0;
  int32_t chain_depth = 1;
  const int32_t* ban_next = nullptr;    // [n_ban]
  const int32_t* ban_off = nullptr;     // [n_ban]
  const int32_t* ban_cnt = nullptr;     // [n_ban]
  const int32_t* heavy_id = nullptr;    // [n_ban] row of heavy_rows (0: none)
  int64_t n_ban = 0;
  int32_t ban_depth = 0;
  const int32_t* ban_word = nullptr;    // [n_pairs]
  const int32_t* ban_mask = nullptr;    // [n_pairs]
  int64_t n_pairs = 0;
  const int32_t* heavy_rows = nullptr;  // [n_heavy, W] (row 0: all allowed)
  int64_t n_heavy = 0;
  const int32_t* base = nullptr;        // [W]
  // ---- text level
  int32_t has_text = 0;
  int32_t classes = 1;                  // C (class C = no character)
  int32_t max_len = 0;                  // slots per token
  int32_t word_boundaries = 1;
  int64_t char_states = 1;
  const int32_t* delta = nullptr;       // [char_states, C]
  const int32_t* out_word = nullptr;    // [char_states]
  const int32_t* out_now = nullptr;     // [char_states]
  const int32_t* act_ctx = nullptr;     // [4C, C+1] new context
  const int32_t* act_sym = nullptr;     // [4C, C+1] symbol or -1
  const int32_t* act_flags = nullptr;   // [4C, C+1] kFlag* bits (BND first, confirms a word end, word character,
                                        // separator)
  const int32_t* slots = nullptr;       // [V + 1, max_len] classes (C: none)
  const int32_t* head_n = nullptr;      // [V + 1] each
  const int32_t* head_bits = nullptr;
  const int32_t* tail_n = nullptr;
  const int32_t* tail_bits = nullptr;
  const int32_t* tail_need = nullptr;
  const int32_t* body = nullptr;
  const int32_t* cp0 = nullptr;         // [kCpLimit] classes of a codepoint's first two folded characters
  const int32_t* cp1 = nullptr;
  const int32_t* out_spelled = nullptr; // [char_states] entity of a spelled-out pattern ending here, -1 none
  const int32_t* triple_end = nullptr;  // [char_states] 1: the state's last symbol is SQ3
};

// Tables in the order of fastsafe.safety.device_matcher_ops.NATIVE_TABLES (0: int64, the rest
// int32; 10 heavy_rows, 12 delta and 18 slots are 2-D) and meta = [V, chain_depth, ban_depth,
// has_text, classes, word_boundaries].
constexpr int kMatcherTableCount = 29;
constexpr int kMatcherMetaCount = 6;

// The tables struct from raw pointers, element counts and (2-D tables) column counts. Sizes are
// checked by the caller (bindings.cpp: matcher_tables).
inline MatcherTables make_matcher_tables(const void* const* ptr, const int64_t* numel, const int64_t* cols,
                                         const int64_t* meta) {
  MatcherTables t;
  t.vocab = meta[0];
  t.words = (meta[0] + 31) / 32;
  t.chain_depth = static_cast<int32_t>(meta[1]);
  t.ban_depth = static_cast<int32_t>(meta[2]);
  t.has_text = meta[3] != 0;
  t.classes = static_cast<int32_t>(meta[4]);
  t.word_boundaries = meta[5] != 0;
  auto i32 = [&](int i) { return static_cast<const int32_t*>(ptr[i]); };
  t.goto_keys = static_cast<const int64_t*>(ptr[0]);
  t.n_goto = numel[0];
  t.goto_next = i32(1);
  t.chain_next = i32(2);
  t.tok_states = numel[2];
  t.ban_first = i32(3);
  t.ban_next = i32(4);
  t.n_ban = numel[4];
  t.ban_off = i32(5);
  t.ban_cnt = i32(6);
  t.heavy_id = i32(7);
  t.ban_word = i32(8);
  t.n_pairs = numel[8];
  t.ban_mask = i32(9);
  t.heavy_rows = i32(10);
  t.n_heavy = cols[10] > 0 ? numel[10] / cols[10] : 0;
  t.base = i32(11);
  t.delta = i32(12);
  t.char_states = cols[12] > 0 ? numel[12] / cols[12] : 1;
  t.out_word = i32(13);
  t.out_now = i32(14);
  t.act_ctx = i32(15);
  t.act_sym = i32(16);
  t.act_flags = i32(17);
  t.slots = i32(18);
  t.max_len = static_cast<int32_t>(cols[18]);
  t.head_n = i32(19);
  t.head_bits = i32(20);
  t.tail_n = i32(21);
  t.tail_bits = i32(22);
  t.tail_need = i32(23);
  t.body = i32(24);
  t.cp0 = i32(25);
  t.cp1 = i32(26);
  t.out_spelled = i32(27);
  t.triple_end = i32(28);
  return t;
}

// One call of a step op on a batch of rows (what the CPU and CUDA launchers take, besides the
// tables and their threads / stream). Each op reads and writes the fields it names:
//   advance:          state, width, batch, ids = tokens [batch]             -> out_state [batch, width]
//   banned_bitmask:   state, width, batch                                   -> words [batch, W]
//   check_candidates: state, width, batch, ids = candidates [batch, k], k   -> ok, entity [batch, k]
struct MatcherCall {
  const int64_t* state = nullptr;   // [batch, width] int64, width >= kMatcherStateColumns
  int64_t width = 0;
  int64_t batch = 0;
  const int64_t* ids = nullptr;
  int64_t k = 0;
  int64_t* out_state = nullptr;
  int32_t* words = nullptr;
  bool* ok = nullptr;
  int32_t* entity = nullptr;
};

// The text part of a row's state.
struct TextState {
  int64_t s, ctx, cp, need, shadow, pend;
};

FASTSAFE_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Every column into the range where it is a valid index (a no-op for states this matcher made).
FASTSAFE_HD void sanitize_state(const MatcherTables& t, const int64_t* in, int64_t* tok, TextState* ts) {
  *tok = clamp64(in[kStTok], 0, t.tok_states - 1);
  ts->s = clamp64(in[kStChr], 0, t.char_states - 1);
  ts->ctx = clamp64(in[kStCtx], 0, 4 * static_cast<int64_t>(t.classes) - 1);
  ts->cp = clamp64(in[kStCp], 0, (int64_t{1} << 24) - 1);
  ts->need = clamp64(in[kStNeed], 0, 3);
  ts->shadow = clamp64(in[kStShadow], -1, t.char_states - 1);
  ts->pend = clamp64(in[kStPend], -1, kPendLimit - 1);
}

// ---------------------------------------------------------------------------------- token level
FASTSAFE_HD int64_t lower_bound64(const int64_t* a, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (a[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The token state after appending token `tok` (ids outside [0, V): the root).
FASTSAFE_HD int64_t token_step(const MatcherTables& t, int64_t s, int64_t tok) {
  if (tok < 0 || tok >= t.vocab) return 0;
  int64_t cur = s;
  for (int32_t d = 0; d < t.chain_depth; ++d) {
    const int64_t key = cur * t.vocab + tok;
    const int64_t i = lower_bound64(t.goto_keys, t.n_goto, key);
    if (i < t.n_goto && t.goto_keys[i] == key) return t.goto_next[i];
    if (cur == 0) return 0;
    cur = t.chain_next[cur];
  }
  return 0;
}

// Applies the bans of token state `s` to a row of W words that already holds `base` (the CPU
// kernel; the CUDA kernel spreads the same walk over the threads of a block).
FASTSAFE_HD void apply_bans(const MatcherTables& t, int64_t s, int32_t* row) {
  int64_t b = t.ban_first[s];
  for (int32_t d = 0; d < t.ban_depth && b >= 0; ++d) {
    const int64_t off = t.ban_off[b], cnt = t.ban_cnt[b];
    for (int64_t j = 0; j < cnt; ++j) row[t.ban_word[off + j]] &= t.ban_mask[off + j];
    const int64_t h = t.heavy_id[b];
    if (h > 0) {
      const int32_t* hr = t.heavy_rows + h * t.words;
      for (int64_t w = 0; w < t.words; ++w) row[w] &= hr[w];
    }
    b = t.ban_next[b];
  }
}

// ---------------------------------------------------------------------------------- text level
struct TextHit {
  int64_t hit = -1;
  bool fresh = false;
};

// One character of class `c` (C = none) through the character DFA (DeviceMatcher._char_step):
// first the pending spelled-out match, then the DFA move with the repeat readings. `h.fresh` is
// kept in both modes (a new pending match records it); hits only with kTrack.
template <bool kTrack>
FASTSAFE_HD void char_step(const MatcherTables& t, TextState& st, int64_t c, TextHit& h) {
  const int64_t C = t.classes;
  const int64_t i = st.ctx * (C + 1) + c;
  const int32_t raw_sym = t.act_sym[i];
  const bool emit = raw_sym >= 0;
  const int64_t sym = emit ? raw_sym : 0;
  const int32_t flags = t.act_flags[i];
  const bool conf = (flags & kFlagConfirm) != 0, word = (flags & kFlagWord) != 0;
  const bool sep = (flags & kFlagSeparator) != 0;
  const bool other = conf && !sep;
  const int64_t s = st.s;
  // ---- spelled-out runs
  const bool has = st.pend >= 0;
  const bool lvl2 = has && (st.pend & 1) != 0;
  const bool lvl1 = has && !lvl2;
  const int64_t osp = t.out_spelled[s];
  if (kTrack) {
    const int64_t ow = t.out_word[s];
    if (conf && h.fresh && ow >= 0) h.hit = ow;
    if ((st.pend & 2) != 0 && ((lvl1 && other) || (lvl2 && word))) h.hit = st.pend >> 2;
    if (other && h.fresh && osp >= 0) h.hit = osp;
  }
  if (sep && osp >= 0) {
    st.pend = osp * 4 + (h.fresh ? 2 : 0);
  } else if (lvl1 && word) {
    st.pend |= 1;
  } else if (has && (conf || word || sep) && !(lvl1 && sep)) {
    st.pend = -1;
  }
  // ---- the DFA
  if (emit) {
    const int64_t s1 = (t.word_boundaries && (flags & kFlagBnd)) ? t.delta[s * C + kBnd] : s;
    const int64_t raw = t.delta[s1 * C + sym];
    const bool dead = raw == 0;
    const bool sq2 = sym == kSq2, rep = sym == kSq3 || sym == kSq4;
    const bool has_shadow = st.shadow >= 0;
    int64_t s2;
    if (rep) {
      const bool broken = sym == kSq4 && t.triple_end[s] != 0;
      s2 = !dead ? raw : (has_shadow && (s == 0 || broken)) ? st.shadow : (broken ? 0 : s);
    } else if (sq2) {
      s2 = raw;
    } else {
      const bool run3 = (st.ctx & 3) >= 2;
      s2 = (dead && run3 && has_shadow) ? static_cast<int64_t>(t.delta[st.shadow * C + sym]) : raw;
    }
    st.shadow = sq2 ? s : (rep ? st.shadow : -1);
    st.s = s2;
    const bool changed = !(dead && (sq2 || rep));
    if (kTrack) {
      const int64_t nw = t.out_now[s2];
      if (changed && nw >= 0) h.hit = nw;
    }
    h.fresh = h.fresh || changed;
  }
  st.ctx = t.act_ctx[i];
}

// One token through the character DFA (DeviceMatcher._text_run): a pending UTF-8 character
// finished by the token's head, the token's slots, its unfinished tail. With kTrack, returns the
// entity of a new occurrence the token completes (-1: none).
template <bool kTrack>
FASTSAFE_HD int64_t text_run(const MatcherTables& t, TextState& st, int64_t tok) {
  const int64_t C = t.classes;
  const int64_t row = (tok >= 0 && tok < t.vocab) ? tok : t.vocab;
  TextHit h;
  const int64_t hn = t.head_n[row];
  const int64_t hb = t.head_bits[row];
  const bool done = st.need > 0 && hn >= st.need;
  int64_t c0 = C, c1 = C;
  if (done) {
    const int64_t sh = 6 * (hn - st.need);
    const int64_t full = (st.cp << (6 * st.need)) | (hb >> sh);
    if (full >= kCpLimit) {
      c0 = kOtherNonword;
    } else {
      c0 = t.cp0[full];
      c1 = t.cp1[full];
    }
  }
  if (st.need > hn && hn > 0) {              // still unfinished after this token's head
    st.cp = (st.cp << (6 * hn)) | hb;
    st.need -= hn;
  }
  if (c0 != C) char_step<kTrack>(t, st, c0, h);
  if (c1 != C) char_step<kTrack>(t, st, c1, h);
  const int32_t* sl = t.slots + row * static_cast<int64_t>(t.max_len);
  for (int32_t j = 0; j < t.max_len; ++j) {
    const int64_t c = sl[j];
    if (c == C) break;
    char_step<kTrack>(t, st, c, h);
  }
  const int64_t tn = t.tail_n[row];
  if (tn > 0) {
    st.cp = t.tail_bits[row];
    st.need = t.tail_need[row];
  } else if (t.body[row] > 0 || done) {
    st.cp = 0;
    st.need = 0;
  }
  const bool lvl1 = st.pend >= 0 && (st.pend & 1) == 0;
  if (kTrack) {  // the text may end after the candidate
    const int64_t ow = t.out_word[st.s];
    if (h.fresh && ow >= 0) h.hit = ow;
    const int64_t osp = t.out_spelled[st.s];
    if (h.fresh && osp >= 0) h.hit = osp;
    if (lvl1 && (st.pend & 2) != 0) h.hit = st.pend >> 2;
  }
  if (lvl1) st.pend &= ~int64_t{2};  // reported at this token's end: old from now on
  return h.hit;
}

// ---------------------------------------------------------------------------------- one row
// advance: state row `in` (stride `width`) -> `out`; columns >= kMatcherStateColumns are copied.
FASTSAFE_HD void advance_row(const MatcherTables& t, const int64_t* in, int64_t* out, int64_t width, int64_t tok) {
  int64_t ts;
  TextState st;
  sanitize_state(t, in, &ts, &st);
  out[kStTok] = token_step(t, ts, tok);
  if (t.has_text) {
    text_run<false>(t, st, tok);
    out[kStChr] = st.s;
    out[kStCtx] = st.ctx;
    out[kStCp] = st.cp;
    out[kStNeed] = st.need;
    out[kStShadow] = st.shadow;
    out[kStPend] = st.pend;
  } else {
    for (int c = 1; c < kMatcherStateColumns; ++c) out[c] = in[c];
  }
  for (int64_t c = kMatcherStateColumns; c < width; ++c) out[c] = in[c];
}

// check_candidates of one (row, candidate): ok and entity.
FASTSAFE_HD void check_one(const MatcherTables& t, const int64_t* in, int64_t cand, bool* ok, int32_t* entity) {
  const bool valid = cand >= 0 && cand < t.vocab;
  int64_t hit = -1;
  if (t.has_text) {
    int64_t ts;
    TextState st;
    sanitize_state(t, in, &ts, &st);
    hit = text_run<true>(t, st, cand);
  }
  *ok = valid && hit < 0;
  *entity = static_cast<int32_t>(hit);
}

}  // namespace fastsafe
