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

#include "safe_topk_args.h"
#include "safe_topk_cpu.h"

#ifdef FASTSAFE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "safe_topk_cuda.h"
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
  m.def("cpu_isa", &fastsafe::safe_topk_cpu_isa,
        "Instruction set of the CPU kernel's vector loops on this machine: 'avx512f', 'avx2' or 'baseline' "
        "(FASTSAFE_CPU_ISA=baseline|avx2 caps it).");
#ifdef FASTSAFE_WITH_CUDA
  m.def("safe_topk_cuda", &safe_topk_cuda_op, doc, pybind11::arg("logits"), pybind11::arg("k"),
        pybind11::arg("bias_table"), pybind11::arg("positions"), pybind11::arg("bias_scale"),
        pybind11::arg("banned_bitmask"), pybind11::arg("dense_reward"), pybind11::arg("reward_weight"),
        pybind11::arg("temperature"));
  m.attr("cuda_max_k") = fastsafe::kCudaMaxK;
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
