// Runs the kernels of csrc/device_matcher_cuda.cu under the CPU emulation (cuda_emu.h): one step
// (advance, then the bitmask and the candidate check of the new state), with the launch shapes of
// the real launchers.
//
// Build: g++ -std=c++20 -O1 -pthread -DFASTSAFE_CUDA_EMULATION -Icsrc/emulation/include -Icsrc
//            csrc/emulation/run_device_matcher.cpp -o run_device_matcher
// Usage: run_device_matcher CASE OUT
//   CASE: int64 {B, width, k, meta[6]}, then per table of NATIVE_TABLES (27): int64 {numel, cols
//         (0: 1-D)} and its data (table 0 int64, the others int32), then state [B, width] int64,
//         tokens [B] int64, candidates [B, k] int64.
//   OUT:  state [B, width] int64, words [B, ceil(V/32)] int32, ok [B, k] uint8, entity [B, k] int32.
// tests/test_device_matcher_native.py writes the cases and compares OUT with the C++ CPU kernels.
#include "../device_matcher_cuda.cu"

#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace fastsafe;

template <typename T>
std::vector<T> rd(FILE* f, size_t n) {
  std::vector<T> v(n);
  if (n && fread(v.data(), sizeof(T), n, f) != n) {
    perror("run_device_matcher: short case file");
    exit(2);
  }
  return v;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: run_device_matcher CASE OUT\n");
    return 1;
  }
  FILE* f = fopen(argv[1], "rb");
  if (f == nullptr) {
    perror("run_device_matcher: case file");
    return 1;
  }
  const auto h = rd<int64_t>(f, 3 + kMatcherMetaCount);
  const int64_t B = h[0], width = h[1], k = h[2];
  const int64_t* meta = h.data() + 3;
  std::vector<std::vector<int64_t>> t64(1);
  std::vector<std::vector<int32_t>> t32(kMatcherTableCount);
  const void* ptr[kMatcherTableCount];
  int64_t numel[kMatcherTableCount], cols[kMatcherTableCount];
  for (int i = 0; i < kMatcherTableCount; ++i) {
    const auto nc = rd<int64_t>(f, 2);
    numel[i] = nc[0];
    cols[i] = nc[1];
    if (i == 0) {
      t64[0] = rd<int64_t>(f, nc[0]);
      ptr[i] = t64[0].data();
    } else {
      t32[i] = rd<int32_t>(f, nc[0]);
      ptr[i] = t32[i].data();
    }
  }
  const auto state = rd<int64_t>(f, B * width);
  const auto tokens = rd<int64_t>(f, B);
  const auto cand = rd<int64_t>(f, B * k);
  fclose(f);
  const MatcherTables t = make_matcher_tables(ptr, numel, cols, meta);

  std::vector<int64_t> out(B * width);
  std::vector<int32_t> words(B * t.words);
  std::vector<uint8_t> ok(B * k);
  std::vector<int32_t> entity(B * k);
  if (B > 0) {
    MatcherCall adv;
    adv.state = state.data();
    adv.width = width;
    adv.batch = B;
    adv.ids = tokens.data();
    adv.out_state = out.data();
    emu_launch(advance_kernel, blocks_for(B, kThreads), kThreads, StepParams{t, adv});
    MatcherCall next;                 // the bitmask and the check read the new state
    next.state = out.data();
    next.width = width;
    next.batch = B;
    next.words = words.data();
    next.ids = cand.data();
    next.k = k;
    next.ok = reinterpret_cast<bool*>(ok.data());
    next.entity = entity.data();
    emu_launch(bitmask_kernel, static_cast<unsigned>(B), kBitmaskThreads, StepParams{t, next});
    if (k > 0) emu_launch(check_kernel, blocks_for(B * k, kThreads), kThreads, StepParams{t, next});
  }
  FILE* o = fopen(argv[2], "wb");
  if (o == nullptr) {
    perror("run_device_matcher: output file");
    return 1;
  }
  fwrite(out.data(), sizeof(int64_t), out.size(), o);
  fwrite(words.data(), sizeof(int32_t), words.size(), o);
  fwrite(ok.data(), 1, ok.size(), o);
  fwrite(entity.data(), sizeof(int32_t), entity.size(), o);
  fclose(o);
  return 0;
}
