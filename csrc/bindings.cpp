// pybind11 binding of fastsafe._C: converts tensors to raw pointers for the kernels.
//
// The Python layer (fastsafe/ops/validate.py) validates and normalises the arguments; the
// checks here are a second line that keeps the kernels from ever reading out of bounds when
// the extension is called directly. Errors name the argument, the expected and the received
// value (ValueError / TypeError on the Python side).
// Light includes (not <torch/extension.h>): the tensor type, `empty`, the parallel settings and
// torch's pybind11 casters are all this file needs, and they halve the build time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "safe_topk_args.h"
#include "safe_topk_cpu.h"
#include "device_matcher_cpu.h"

#ifdef FASTSAFE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "safe_topk_cuda.h"
#include "device_matcher_cuda.h"
#endif

namespace {

using OptTensor = std::optional<at::Tensor>;
using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

fastsafe::ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fastsafe::ScalarKind::Float32;
    case at::kHalf:
      return fastsafe::ScalarKind::Float16;
    case at::kBFloat16:
      return fastsafe::ScalarKind::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return fastsafe::ScalarKind::Float32;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, ": expected a tensor on logits' device ",
                    logits.device(), ", got ", t.device());
}

// Rows of a [B, V] tensor must be unit-stride (any row stride); a single column is always fine.
void check_unit_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) == 1 || t.stride(1) == 1, name,
                    ": expected unit stride along the vocabulary dimension, got strides ", t.strides());
  TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) >= 0, name, ": expected a non-negative row stride, got ",
                    t.strides());
}

// Fills `args` from the tensors (outputs excluded) after checking everything the kernels rely on.
fastsafe::SafeTopKArgs make_args(const at::Tensor& logits, int64_t k, const OptTensor& bias_table,
                                 const OptTensor& positions, double bias_scale, const OptTensor& banned_bitmask,
                                 const OptTensor& dense_reward, double reward_weight, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D tensor [B, V], got shape ", logits.sizes());
  fastsafe::SafeTopKArgs a;
  a.dtype = scalar_kind(logits, "logits");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V >= 1, "logits: expected a vocabulary size V >= 1, got shape ", logits.sizes());
  TORCH_CHECK_VALUE(V <= std::numeric_limits<int32_t>::max(), "logits: expected V < 2^31, got V = ", V);
  check_unit_stride(logits, "logits");
  TORCH_CHECK_VALUE(k >= 1 && k <= V, "k: expected 1 <= k <= V = ", V, ", got ", k);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "temperature: expected a finite number > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(std::isfinite(bias_scale), "bias_scale: expected a finite number, got ", bias_scale);
  TORCH_CHECK_VALUE(std::isfinite(reward_weight), "reward_weight: expected a finite number, got ", reward_weight);

  a.logits = logits.data_ptr();
  a.logits_row_stride = B > 1 ? logits.stride(0) : 0;
  a.batch = B;
  a.vocab = V;
  a.k = k;
  // Python floats become float32 exactly as torch does for `float32_tensor op python_float`.
  a.temperature = static_cast<float>(temperature);
  a.bias_scale = static_cast<float>(bias_scale);
  a.reward_weight = static_cast<float>(reward_weight);

  if (bias_table.has_value()) {
    const at::Tensor& t = *bias_table;
    check_device(t, "bias_table", logits);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) >= 1 && t.size(1) == V,
                      "bias_table: expected shape [L, V] = [L >= 1, ", V, "], got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "bias_table: expected dtype float32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.is_contiguous(), "bias_table: expected a contiguous tensor, got strides ", t.strides());
    a.bias_table = t.data_ptr<float>();
    a.bias_rows = t.size(0);
    if (positions.has_value()) {
      const at::Tensor& p = *positions;
      check_device(p, "positions", logits);
      TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == B, "positions: expected shape [B] = [", B, "], got ",
                        p.sizes());
      TORCH_CHECK_TYPE(p.scalar_type() == at::kLong, "positions: expected dtype int64, got ", p.scalar_type());
      TORCH_CHECK_VALUE(p.is_contiguous(), "positions: expected a contiguous tensor");
      a.positions = p.data_ptr<int64_t>();  // clamped to [0, L-1] again by the kernels
    } else {
      TORCH_CHECK_VALUE(a.bias_rows == 1, "positions: required when bias_table has L = ", a.bias_rows,
                        " > 1 rows");
    }
  }

  if (banned_bitmask.has_value()) {
    const at::Tensor& m = *banned_bitmask;
    const int64_t W = fastsafe::bitmask_words(V);
    check_device(m, "banned_bitmask", logits);
    TORCH_CHECK_TYPE(m.scalar_type() == at::kInt, "banned_bitmask: expected dtype int32, got ", m.scalar_type());
    const bool shared = m.dim() == 1 || (m.dim() == 2 && m.size(0) == 1);
    TORCH_CHECK_VALUE(m.dim() >= 1 && m.dim() <= 2 && m.size(-1) == W && (shared || m.size(0) == B),
                      "banned_bitmask: expected shape [B, W] = [", B, ", ", W, "] or [W] = [", W,
                      "] (W = ceil(V/32) words), got ", m.sizes());
    TORCH_CHECK_VALUE(m.is_contiguous(), "banned_bitmask: expected a contiguous tensor");
    a.bitmask = m.data_ptr<int32_t>();
    a.bitmask_rows = shared ? 1 : B;
  }

  if (dense_reward.has_value()) {
    const at::Tensor& r = *dense_reward;
    check_device(r, "dense_reward", logits);
    TORCH_CHECK_VALUE(r.dim() == 2 && r.size(0) == B && r.size(1) == V, "dense_reward: expected shape [B, V] = [",
                      B, ", ", V, "], got ", r.sizes());
    TORCH_CHECK_TYPE(r.scalar_type() == logits.scalar_type(), "dense_reward: expected logits' dtype ",
                     logits.scalar_type(), ", got ", r.scalar_type());
    check_unit_stride(r, "dense_reward");
    a.dense_reward = r.data_ptr();
    a.reward_row_stride = B > 1 ? r.stride(0) : 0;
  }
  return a;
}

Result make_outputs(const at::Tensor& logits, int64_t k, fastsafe::SafeTopKArgs& a) {
  const auto opts = logits.options();
  at::Tensor values = at::empty({a.batch, k}, opts.dtype(at::kFloat));
  at::Tensor indices = at::empty({a.batch, k}, opts.dtype(at::kLong));
  at::Tensor lse = at::empty({a.batch}, opts.dtype(at::kFloat));
  a.values = values.data_ptr<float>();
  a.indices = indices.data_ptr<int64_t>();
  a.lse = lse.data_ptr<float>();
  return {values, indices, lse};
}

Result safe_topk_cpu_op(const at::Tensor& logits, int64_t k, const OptTensor& bias_table, const OptTensor& positions,
                        double bias_scale, const OptTensor& banned_bitmask, const OptTensor& dense_reward,
                        double reward_weight, double temperature) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits: expected a CPU tensor for safe_topk_cpu, got ",
                    logits.device());
  fastsafe::SafeTopKArgs a = make_args(logits, k, bias_table, positions, bias_scale, banned_bitmask, dense_reward,
                                       reward_weight, temperature);
  Result out = make_outputs(logits, k, a);
  if (a.batch == 0) return out;
  // Respect torch.set_num_threads(); stay serial when already inside a torch parallel region.
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    fastsafe::safe_topk_cpu(a, threads);
  }
  return out;
}

#ifdef FASTSAFE_WITH_CUDA
Result safe_topk_cuda_op(const at::Tensor& logits, int64_t k, const OptTensor& bias_table, const OptTensor& positions,
                         double bias_scale, const OptTensor& banned_bitmask, const OptTensor& dense_reward,
                         double reward_weight, double temperature) {
  TORCH_CHECK_VALUE(logits.device().is_cuda(), "logits: expected a CUDA tensor for safe_topk_cuda, got ",
                    logits.device());
  TORCH_CHECK_VALUE(k <= fastsafe::kCudaMaxK, "k: the cuda backend supports 1 <= k <= ", fastsafe::kCudaMaxK,
                    ", got k = ", k, " (use backend='torch' or 'triton' for a larger k)");
  const c10::cuda::CUDAGuard guard(logits.device());
  fastsafe::SafeTopKArgs a = make_args(logits, k, bias_table, positions, bias_scale, banned_bitmask, dense_reward,
                                       reward_weight, temperature);
  Result out = make_outputs(logits, k, a);
  if (a.batch == 0) return out;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, logits.device().index()));
  const fastsafe::CudaTopKPlan plan = fastsafe::safe_topk_cuda_plan(a.batch, a.vocab, a.k, sms);
  TORCH_CHECK_VALUE(plan.splits > 0, "logits: shape ", logits.sizes(), " is too large for the cuda backend");
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, logits.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  const cudaError_t err = fastsafe::safe_topk_cuda(a, plan, workspace.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "safe_topk_cuda: CUDA error: ", cudaGetErrorString(err));
  return out;
}
#endif


// ---------------------------------------------------------------------------------- device matcher
// Tables in the order of fastsafe.safety.device_matcher_ops.NATIVE_TABLES; meta = [V, chain_depth,
// ban_depth, has_text, classes, word_boundaries].
constexpr size_t kMatcherTableCount = fastsafe::kMatcherTableCount;

void check_table(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t dim, const at::Tensor& state) {
  TORCH_CHECK_VALUE(x.device() == state.device(), "tables: ", name, " expected on the state's device ", state.device(),
                    ", got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, "tables: ", name, " expected dtype ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == dim && x.is_contiguous() && x.numel() >= 1, "tables: ", name, " expected a non-empty "
                    "contiguous ", dim, "-D tensor, got shape ", x.sizes());
}

void check_size(const at::Tensor& x, const char* name, int64_t d, int64_t want) {
  TORCH_CHECK_VALUE(x.size(d) == want, "tables: ", name, " expected size ", want, " in dim ", d, ", got shape ",
                    x.sizes());
}

// The kernels' view of the tables after checking dtypes, devices and every size they index with.
fastsafe::MatcherTables matcher_tables(const std::vector<at::Tensor>& tb, const std::vector<int64_t>& meta,
                                       const at::Tensor& state) {
  TORCH_CHECK_VALUE(tb.size() == kMatcherTableCount, "tables: expected ", kMatcherTableCount, " tensors, got ",
                    tb.size());
  TORCH_CHECK_VALUE(meta.size() == fastsafe::kMatcherMetaCount, "meta: expected 6 ints [V, chain_depth, ban_depth, has_text, classes, "
                    "word_boundaries], got ", meta.size());
  static const char* names[kMatcherTableCount] = {
      "goto_keys", "goto_next", "chain_next", "ban_first", "ban_next", "ban_off", "ban_cnt", "heavy_id", "ban_word",
      "ban_mask", "heavy_rows", "base", "delta", "out_word", "out_now", "act_ctx", "act_sym", "act_flags", "slots",
      "head_n", "head_bits", "tail_n", "tail_bits", "tail_need", "body", "cp0", "cp1", "out_spelled", "triple_end"};
  for (size_t i = 0; i < kMatcherTableCount; ++i) {
    const bool two_d = i == 10 || i == 12 || i == 18;
    check_table(tb[i], names[i], i == 0 ? at::kLong : at::kInt, two_d ? 2 : 1, state);
  }
  const int64_t V = meta[0], W = (V + 31) / 32, C = meta[4];
  TORCH_CHECK_VALUE(V >= 1 && V <= (int64_t{1} << 20), "meta: expected 1 <= V <= 2^20, got ", V);
  TORCH_CHECK_VALUE(meta[1] >= 1 && meta[2] >= 0 && C >= 6 && C < (1 << 15), "meta: expected chain_depth >= 1, "
                    "ban_depth >= 0 and 6 <= classes < 2^15, got ", meta[1], ", ", meta[2], ", ", C);
  check_size(tb[1], names[1], 0, tb[0].numel());                              // goto_next
  check_size(tb[3], names[3], 0, tb[2].numel());                              // ban_first
  for (int i = 5; i <= 7; ++i) check_size(tb[i], names[i], 0, tb[4].numel());  // ban_off, ban_cnt, heavy_id
  check_size(tb[9], names[9], 0, tb[8].numel());                              // ban_mask
  check_size(tb[10], names[10], 1, W);
  check_size(tb[11], names[11], 0, W);
  if (meta[3] != 0) {  // without text rules the kernels read none of these (placeholders of one element)
    check_size(tb[12], names[12], 1, C);
    check_size(tb[13], names[13], 0, tb[12].size(0));
    check_size(tb[14], names[14], 0, tb[12].size(0));
    for (int i = 15; i <= 17; ++i) check_size(tb[i], names[i], 0, 4 * C * (C + 1));
    check_size(tb[18], names[18], 0, V + 1);
    for (int i = 19; i <= 24; ++i) check_size(tb[i], names[i], 0, V + 1);
    check_size(tb[25], names[25], 0, fastsafe::kCpLimit);
    check_size(tb[26], names[26], 0, fastsafe::kCpLimit);
    check_size(tb[27], names[27], 0, tb[12].size(0));
    check_size(tb[28], names[28], 0, tb[12].size(0));
  }
  const void* ptr[kMatcherTableCount];
  int64_t numel[kMatcherTableCount], cols[kMatcherTableCount];
  for (size_t i = 0; i < kMatcherTableCount; ++i) {
    ptr[i] = tb[i].data_ptr();
    numel[i] = tb[i].numel();
    cols[i] = tb[i].dim() == 2 ? tb[i].size(1) : 0;
  }
  return fastsafe::make_matcher_tables(ptr, numel, cols, meta.data());
}

void check_state(const at::Tensor& state) {
  TORCH_CHECK_TYPE(state.scalar_type() == at::kLong, "state: expected dtype int64, got ", state.scalar_type());
  TORCH_CHECK_VALUE(state.dim() == 2 && state.size(1) >= fastsafe::kMatcherStateColumns && state.is_contiguous(),
                    "state: expected a contiguous int64 tensor [B, >= ", fastsafe::kMatcherStateColumns, "], got shape ",
                    state.sizes());
}

void check_ids(const at::Tensor& ids, const char* name, int64_t dim, const at::Tensor& state) {
  TORCH_CHECK_VALUE(ids.device() == state.device(), name, ": expected a tensor on the state's device ", state.device(),
                    ", got ", ids.device());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, name, ": expected dtype int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == dim && ids.size(0) == state.size(0) && ids.is_contiguous(), name, ": expected a "
                    "contiguous ", dim == 1 ? "[B]" : "[B, k]", " tensor with B = ", state.size(0), ", got shape ",
                    ids.sizes());
}

// On the CPU the state's values are checked too (cheap, and no device to synchronise with): a
// state this matcher did not make is an error here (the CUDA kernels clamp it instead).
void check_state_values(const fastsafe::MatcherTables& t, const at::Tensor& state) {
  const int64_t B = state.size(0), w = state.size(1);
  const int64_t* s = state.data_ptr<int64_t>();
  const int64_t hi[fastsafe::kMatcherStateColumns] = {t.tok_states, t.char_states, 4 * int64_t{t.classes},
                                                      int64_t{1} << 24, 4, t.char_states, fastsafe::kPendLimit};
  const char* col[fastsafe::kMatcherStateColumns] = {"token state", "character state", "character context",
                                                     "partial character", "missing bytes", "shadow state",
                                                     "pending spelled match"};
  for (int64_t b = 0; b < B; ++b) {
    for (int c = 0; c < fastsafe::kMatcherStateColumns; ++c) {
      const int64_t v = s[b * w + c], lo = c == fastsafe::kStShadow || c == fastsafe::kStPend ? -1 : 0;
      TORCH_CHECK_VALUE(v >= lo && v < hi[c], "state: row ", b, " column ", c, " (", col[c], ") = ", v,
                        " is outside [", lo, ", ", hi[c], "): not a state of this matcher");
    }
  }
}

int cpu_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// The rows part of a step op's call (the op fills in its inputs and outputs).
fastsafe::MatcherCall matcher_call(const at::Tensor& state) {
  fastsafe::MatcherCall call;
  call.state = state.data_ptr<int64_t>();
  call.width = state.size(1);
  call.batch = state.size(0);
  return call;
}

at::Tensor matcher_advance_cpu_op(const at::Tensor& state, const at::Tensor& token_ids,
                                  const std::vector<at::Tensor>& tables, const std::vector<int64_t>& meta) {
  TORCH_CHECK_VALUE(state.device().is_cpu(), "state: expected a CPU tensor, got ", state.device());
  check_state(state);
  check_ids(token_ids, "token_ids", 1, state);
  const fastsafe::MatcherTables t = matcher_tables(tables, meta, state);
  check_state_values(t, state);
  at::Tensor out = at::empty(state.sizes(), state.options());
  if (state.size(0) == 0) return out;
  pybind11::gil_scoped_release no_gil;
  fastsafe::MatcherCall call = matcher_call(state);
  call.ids = token_ids.data_ptr<int64_t>();
  call.out_state = out.data_ptr<int64_t>();
  fastsafe::matcher_advance_cpu(t, call, cpu_threads());
  return out;
}

at::Tensor matcher_banned_bitmask_cpu_op(const at::Tensor& state, const std::vector<at::Tensor>& tables,
                                         const std::vector<int64_t>& meta) {
  TORCH_CHECK_VALUE(state.device().is_cpu(), "state: expected a CPU tensor, got ", state.device());
  check_state(state);
  const fastsafe::MatcherTables t = matcher_tables(tables, meta, state);
  check_state_values(t, state);
  at::Tensor out = at::empty({state.size(0), t.words}, state.options().dtype(at::kInt));
  if (state.size(0) == 0) return out;
  pybind11::gil_scoped_release no_gil;
  fastsafe::MatcherCall call = matcher_call(state);
  call.words = out.data_ptr<int32_t>();
  fastsafe::matcher_banned_bitmask_cpu(t, call, cpu_threads());
  return out;
}

std::tuple<at::Tensor, at::Tensor> matcher_check_candidates_cpu_op(const at::Tensor& state, const at::Tensor& cand_ids,
                                                                   const std::vector<at::Tensor>& tables,
                                                                   const std::vector<int64_t>& meta) {
  TORCH_CHECK_VALUE(state.device().is_cpu(), "state: expected a CPU tensor, got ", state.device());
  check_state(state);
  check_ids(cand_ids, "cand_ids", 2, state);
  const fastsafe::MatcherTables t = matcher_tables(tables, meta, state);
  check_state_values(t, state);
  at::Tensor ok = at::empty(cand_ids.sizes(), state.options().dtype(at::kBool));
  at::Tensor ent = at::empty(cand_ids.sizes(), state.options().dtype(at::kInt));
  if (cand_ids.numel() == 0) return {ok, ent};
  pybind11::gil_scoped_release no_gil;
  fastsafe::MatcherCall call = matcher_call(state);
  call.ids = cand_ids.data_ptr<int64_t>();
  call.k = cand_ids.size(1);
  call.ok = ok.data_ptr<bool>();
  call.entity = ent.data_ptr<int32_t>();
  fastsafe::matcher_check_candidates_cpu(t, call, cpu_threads());
  return {ok, ent};
}

#ifdef FASTSAFE_WITH_CUDA
fastsafe::MatcherTables cuda_matcher_tables(const at::Tensor& state, const std::vector<at::Tensor>& tables,
                                            const std::vector<int64_t>& meta) {
  TORCH_CHECK_VALUE(state.device().is_cuda(), "state: expected a CUDA tensor, got ", state.device());
  check_state(state);
  return matcher_tables(tables, meta, state);
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

at::Tensor matcher_advance_cuda_op(const at::Tensor& state, const at::Tensor& token_ids,
                                   const std::vector<at::Tensor>& tables, const std::vector<int64_t>& meta) {
  const c10::cuda::CUDAGuard guard(state.device());
  const fastsafe::MatcherTables t = cuda_matcher_tables(state, tables, meta);
  check_ids(token_ids, "token_ids", 1, state);
  at::Tensor out = at::empty(state.sizes(), state.options());
  if (state.size(0) == 0) return out;
  fastsafe::MatcherCall call = matcher_call(state);
  call.ids = token_ids.data_ptr<int64_t>();
  call.out_state = out.data_ptr<int64_t>();
  check_launch(fastsafe::matcher_advance_cuda(t, call, stream_of(state)), "device_matcher_advance_cuda");
  return out;
}

at::Tensor matcher_banned_bitmask_cuda_op(const at::Tensor& state, const std::vector<at::Tensor>& tables,
                                          const std::vector<int64_t>& meta) {
  const c10::cuda::CUDAGuard guard(state.device());
  const fastsafe::MatcherTables t = cuda_matcher_tables(state, tables, meta);
  at::Tensor out = at::empty({state.size(0), t.words}, state.options().dtype(at::kInt));
  if (state.size(0) == 0) return out;
  fastsafe::MatcherCall call = matcher_call(state);
  call.words = out.data_ptr<int32_t>();
  check_launch(fastsafe::matcher_banned_bitmask_cuda(t, call, stream_of(state)), "device_matcher_banned_bitmask_cuda");
  return out;
}

std::tuple<at::Tensor, at::Tensor> matcher_check_candidates_cuda_op(const at::Tensor& state,
                                                                    const at::Tensor& cand_ids,
                                                                    const std::vector<at::Tensor>& tables,
                                                                    const std::vector<int64_t>& meta) {
  const c10::cuda::CUDAGuard guard(state.device());
  const fastsafe::MatcherTables t = cuda_matcher_tables(state, tables, meta);
  check_ids(cand_ids, "cand_ids", 2, state);
  at::Tensor ok = at::empty(cand_ids.sizes(), state.options().dtype(at::kBool));
  at::Tensor ent = at::empty(cand_ids.sizes(), state.options().dtype(at::kInt));
  if (cand_ids.numel() == 0) return {ok, ent};
  fastsafe::MatcherCall call = matcher_call(state);
  call.ids = cand_ids.data_ptr<int64_t>();
  call.k = cand_ids.size(1);
  call.ok = ok.data_ptr<bool>();
  call.entity = ent.data_ptr<int32_t>();
  check_launch(fastsafe::matcher_check_candidates_cuda(t, call, stream_of(state)),
               "device_matcher_check_candidates_cuda");
  return {ok, ent};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsafe native kernels: the fused safe decoding step (safe_topk) on CPU and CUDA";
  const char* doc =
      "safe_topk_{cpu,cuda}(logits, k, bias_table, positions, bias_scale, banned_bitmask, dense_reward,\n"
      "                    reward_weight, temperature) -> (values [B,k] f32, indices [B,k] i64, lse [B] f32)\n\n"
      "logits [B,V] f32/f16/bf16 (unit stride along V); bias_table None or [L,V] f32 contiguous;\n"
      "positions None or [B] int64; banned_bitmask None or int32 [W] / [B,W] (W = ceil(V/32), bit = 1\n"
      "allowed); dense_reward None or [B,V] in logits' dtype. See fastsafe.ops.safe_topk.";
  m.def("safe_topk_cpu", &safe_topk_cpu_op, doc, pybind11::arg("logits"), pybind11::arg("k"),
        pybind11::arg("bias_table"), pybind11::arg("positions"), pybind11::arg("bias_scale"),
        pybind11::arg("banned_bitmask"), pybind11::arg("dense_reward"), pybind11::arg("reward_weight"),
        pybind11::arg("temperature"));
  m.attr("cpu_block") = fastsafe::kCpuBlock;
  const char* matcher_doc =
      "device_matcher_{advance,banned_bitmask,check_candidates}_{cpu,cuda}: the DeviceMatcher step kernels\n"
      "(state [B, >=6] int64, ids int64, tables and meta of fastsafe.safety.device_matcher_ops). See\n"
      "fastsafe.safety.DeviceMatcher.";
  m.def("device_matcher_advance_cpu", &matcher_advance_cpu_op, matcher_doc, pybind11::arg("state"),
        pybind11::arg("token_ids"), pybind11::arg("tables"), pybind11::arg("meta"));
  m.def("device_matcher_banned_bitmask_cpu", &matcher_banned_bitmask_cpu_op, matcher_doc, pybind11::arg("state"),
        pybind11::arg("tables"), pybind11::arg("meta"));
  m.def("device_matcher_check_candidates_cpu", &matcher_check_candidates_cpu_op, matcher_doc,
        pybind11::arg("state"), pybind11::arg("cand_ids"), pybind11::arg("tables"), pybind11::arg("meta"));
  m.def("cpu_isa", &fastsafe::safe_topk_cpu_isa,
        "Instruction set of the CPU kernel's vector loops on this machine: 'avx512f', 'avx2' or 'baseline' "
        "(FASTSAFE_CPU_ISA=baseline|avx2 caps it).");
#ifdef FASTSAFE_WITH_CUDA
  m.def("safe_topk_cuda", &safe_topk_cuda_op, doc, pybind11::arg("logits"), pybind11::arg("k"),
        pybind11::arg("bias_table"), pybind11::arg("positions"), pybind11::arg("bias_scale"),
        pybind11::arg("banned_bitmask"), pybind11::arg("dense_reward"), pybind11::arg("reward_weight"),
        pybind11::arg("temperature"));
  m.def("device_matcher_advance_cuda", &matcher_advance_cuda_op, matcher_doc, pybind11::arg("state"),
        pybind11::arg("token_ids"), pybind11::arg("tables"), pybind11::arg("meta"));
  m.def("device_matcher_banned_bitmask_cuda", &matcher_banned_bitmask_cuda_op, matcher_doc, pybind11::arg("state"),
        pybind11::arg("tables"), pybind11::arg("meta"));
  m.def("device_matcher_check_candidates_cuda", &matcher_check_candidates_cuda_op, matcher_doc,
        pybind11::arg("state"), pybind11::arg("cand_ids"), pybind11::arg("tables"), pybind11::arg("meta"));
  m.attr("cuda_max_k") = fastsafe::kCudaMaxK;
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
