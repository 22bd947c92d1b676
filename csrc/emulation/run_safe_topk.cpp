// Runs the kernels of csrc/safe_topk_cuda.cu under the CPU emulation (cuda_emu.h) on one case.
//
// Build: g++ -std=c++20 -O2 -ffp-contract=off -pthread -DFASTSAFE_CUDA_EMULATION
//            -Icsrc/emulation/include -Icsrc csrc/emulation/run_safe_topk.cpp -o run_safe_topk
// Usage: run_safe_topk CASE OUT
//   CASE: int64[12] {B, V, k, dtype (0 f32, 1 f16, 2 bf16), has_bias, L, has_positions, has_mask,
//         mask_rows, has_reward, num_sms, logits_row_stride}, float32[4] {bias_scale,
//         reward_weight, temperature, 0}, then the raw arrays: logits ((B-1)*stride + V elements),
//         bias_table [L, V] f32, positions [B] i64, bitmask [mask_rows, ceil(V/32)] i32,
//         dense_reward [B, V] (logits' dtype), each only when present.
//   OUT:  values [B, k] f32, indices [B, k] i64, lse [B] f32. The plan goes to stderr.
// tests/test_native_build.py writes the cases and compares OUT with the torch reference.
#include "../safe_topk_cuda.cu"
#include <cstdio>
#include <cstdlib>

using namespace fastsafe;
template <typename T>
std::vector<T> rd(FILE* f, size_t n) {
  std::vector<T> v(n);
  if (n && fread(v.data(), sizeof(T), n, f) != n) {
    perror("run_safe_topk: short case file");
    exit(2);
  }
  return v;
}
int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: run_safe_topk CASE OUT\n");
    return 1;
  }
  FILE* f = fopen(argv[1], "rb");
  if (f == nullptr) {
    perror("run_safe_topk: case file");
    return 1;
  }
  const auto h = rd<int64_t>(f, 12);
  const auto sc = rd<float>(f, 4);
  const int64_t B = h[0], V = h[1], k = h[2], dt = h[3], has_bias = h[4], L = h[5], has_pos = h[6];
  const int64_t has_mask = h[7], mask_rows = h[8], has_reward = h[9], sms = h[10], stride = h[11];
  const size_t elem = dt == 0 ? 4 : 2;
  const size_t nlog = B > 0 ? static_cast<size_t>((B - 1) * stride + V) : 0;
  const auto logits = rd<uint8_t>(f, nlog * elem);
  std::vector<float> bias;
  std::vector<int64_t> pos;
  std::vector<int32_t> mask;
  std::vector<uint8_t> reward;
  if (has_bias) bias = rd<float>(f, L * V);
  if (has_pos) pos = rd<int64_t>(f, B);
  if (has_mask) mask = rd<int32_t>(f, mask_rows * bitmask_words(V));
  if (has_reward) reward = rd<uint8_t>(f, B * V * elem);
  fclose(f);

  SafeTopKArgs a;
  a.logits = logits.data();
  a.logits_row_stride = stride;
  a.dtype = static_cast<ScalarKind>(dt);
  a.batch = B;
  a.vocab = V;
  a.k = k;
  if (has_bias) {
    a.bias_table = bias.data();
    a.bias_rows = L;
    a.bias_scale = sc[0];
  }
  if (has_pos) a.positions = pos.data();
  if (has_mask) {
    a.bitmask = mask.data();
    a.bitmask_rows = mask_rows;
  }
  if (has_reward) {
    a.dense_reward = reward.data();
    a.reward_row_stride = V;
    a.reward_weight = sc[1];
  }
  a.temperature = sc[2];
  std::vector<float> values(B * k), lse(B);
  std::vector<int64_t> indices(B * k);
  a.values = values.data();
  a.indices = indices.data();
  a.lse = lse.data();

  const CudaTopKPlan plan = safe_topk_cuda_plan(B, V, k, static_cast<int>(sms));
  if (!plan_fits(a, plan)) {
    fprintf(stderr, "run_safe_topk: no plan for B=%ld V=%ld k=%ld\n", (long)B, (long)V, (long)k);
    return 3;
  }
  std::vector<float4> workspace(plan.workspace_bytes / sizeof(float4) + 1);
  const Params p = make_params(a, plan, workspace.data());
  const unsigned grid1 = static_cast<unsigned>(B * plan.splits);
  if (dt == 0) {
    emu_launch(split_kernel<0>, grid1, kThreads1, p);
  } else if (dt == 1) {
    emu_launch(split_kernel<1>, grid1, kThreads1, p);
  } else {
    emu_launch(split_kernel<2>, grid1, kThreads1, p);
  }
  emu_launch(merge_kernel, static_cast<unsigned>(B), kThreads2, p);

  FILE* o = fopen(argv[2], "wb");
  if (o == nullptr) {
    perror("run_safe_topk: output file");
    return 1;
  }
  fwrite(values.data(), sizeof(float), values.size(), o);
  fwrite(indices.data(), sizeof(int64_t), indices.size(), o);
  fwrite(lse.data(), sizeof(float), lse.size(), o);
  fclose(o);
  fprintf(stderr, "splits=%ld slice_len=%ld per_split=%ld\n", (long)plan.splits, (long)plan.slice_len,
          (long)plan.per_split);
  return 0;
}
