// Torch binding of the fused SR AdamW kernel: checks the tensors, builds the chunk table, launches.
// Two calls so that Python can cache the device copy of the chunk table between steps (no host-to-device
// copy in a steady state, which also lets a CUDA graph capture the step):
//   plan(params, grads, exp_avgs, exp_avg_sqs, base_indices, weight_decays) -> (table uint8 CPU, tiles, dtypes)
//   step(table_on_device, num_chunks, tiles, dtypes, scalars, step_tensor|None, step_value, consts..., key, sr)
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>
#include <vector>

#include "sr_adamw.h"

namespace {

using megatron_sr::SrAdamwChunk;
using megatron_sr::SrDtype;

SrDtype dtype_code(const at::Tensor& t, const char* what, bool states) {
  if (t.scalar_type() == at::kBFloat16) return megatron_sr::kBFloat16;
  TORCH_CHECK(t.scalar_type() == at::kFloat, "sr_adamw: ", what, " must be bfloat16 or float32, got ",
              t.scalar_type(), states ? " (optimizer state)" : "");
  return megatron_sr::kFloat32;
}

// t must be a contiguous CUDA tensor on `device`, with `numel` elements.
void check_tensor(const at::Tensor& t, const at::Device& device, int64_t numel, const char* what, size_t i) {
  TORCH_CHECK(t.is_cuda(), "sr_adamw: ", what, "[", i, "] must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, "sr_adamw: ", what, "[", i, "] is on ", t.device(), ", params on ", device);
  TORCH_CHECK(t.is_contiguous(), "sr_adamw: ", what, "[", i, "] must be contiguous");
  TORCH_CHECK(t.numel() == numel, "sr_adamw: ", what, "[", i, "] has ", t.numel(), " elements, its param has ", numel);
}

std::tuple<at::Tensor, int64_t, std::vector<int64_t>> plan(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<int64_t>& base_indices, const std::vector<double>& weight_decays) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "sr_adamw: empty chunk list");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && base_indices.size() == n &&
                  weight_decays.size() == n,
              "sr_adamw: params, grads, exp_avgs, exp_avg_sqs, base_indices, weight_decays differ in length");
  const SrDtype pd = dtype_code(params[0], "param", false);
  const SrDtype gd = dtype_code(grads[0], "grad", false);
  const SrDtype sd = dtype_code(exp_avgs[0], "exp_avg", true);
  at::Tensor table = at::empty({static_cast<int64_t>(n * sizeof(SrAdamwChunk))}, at::kByte);
  auto* chunks = reinterpret_cast<SrAdamwChunk*>(table.data_ptr<uint8_t>());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const at::Device device = params[0].device();
    check_tensor(p, device, p.numel(), "param", i);
    check_tensor(g, device, p.numel(), "grad", i);
    check_tensor(m, device, p.numel(), "exp_avg", i);
    check_tensor(v, device, p.numel(), "exp_avg_sq", i);
    TORCH_CHECK(dtype_code(p, "param", false) == pd && dtype_code(g, "grad", false) == gd &&
                    dtype_code(m, "exp_avg", true) == sd && dtype_code(v, "exp_avg_sq", true) == sd,
                "sr_adamw: chunk ", i, " mixes dtypes; one launch takes one (param, grad, state) dtype triple");
    TORCH_CHECK(base_indices[i] >= 0, "sr_adamw: base_index must be >= 0, got ", base_indices[i]);
    SrAdamwChunk& c = chunks[i];
    c.param = p.data_ptr();
    c.grad = g.data_ptr();
    c.exp_avg = m.data_ptr();
    c.exp_avg_sq = v.data_ptr();
    c.numel = p.numel();
    c.base_index = base_indices[i];
    c.weight_decay = static_cast<float>(weight_decays[i]);  // round to FP32 once, like the reference
    c.tile_start = 0;
    c.vector_ok = 0;
  }
  const int64_t tiles = megatron_sr::sr_adamw_plan(chunks, static_cast<int32_t>(n), pd, gd, sd);
  return {table, tiles, {static_cast<int64_t>(pd), static_cast<int64_t>(gd), static_cast<int64_t>(sd)}};
}

void step(const at::Tensor& table, int64_t num_chunks, int64_t num_tiles, const std::vector<int64_t>& dtypes,
          const at::Tensor& scalars, const c10::optional<at::Tensor>& step_tensor, int64_t step_value, double beta1,
          double beta2, double eps, double one_minus_beta1, double one_minus_beta2, int64_t key0, int64_t key1,
          bool stochastic) {
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == at::kByte && table.is_contiguous() &&
                  table.numel() == num_chunks * static_cast<int64_t>(sizeof(SrAdamwChunk)),
              "sr_adamw: chunk table must be the CUDA copy of plan()'s table");
  TORCH_CHECK(dtypes.size() == 3, "sr_adamw: dtypes must be plan()'s triple");
  TORCH_CHECK(scalars.is_cuda() && scalars.device() == table.device() && scalars.scalar_type() == at::kFloat &&
                  scalars.is_contiguous() && scalars.numel() >= 3,
              "sr_adamw: scalars must be a contiguous float32 CUDA tensor [lr, bc1, bc2] on the params' device");
  const int64_t* step_ptr = nullptr;
  if (step_tensor.has_value()) {
    const at::Tensor& s = *step_tensor;
    TORCH_CHECK(s.is_cuda() && s.device() == table.device() && s.scalar_type() == at::kLong && s.numel() == 1,
                "sr_adamw: step tensor must be a one-element int64 CUDA tensor on the params' device");
    step_ptr = s.data_ptr<int64_t>();
  }
  const c10::cuda::CUDAGuard guard(table.device());
  megatron_sr::SrAdamwParams a{};
  a.chunks = reinterpret_cast<const SrAdamwChunk*>(table.data_ptr<uint8_t>());
  a.num_chunks = static_cast<int32_t>(num_chunks);
  a.num_tiles = num_tiles;
  a.scalars = scalars.data_ptr<float>();
  a.step_ptr = step_ptr;
  a.step_value = step_value;
  a.beta1 = static_cast<float>(beta1);
  a.beta2 = static_cast<float>(beta2);
  a.eps = static_cast<float>(eps);
  a.one_minus_beta1 = static_cast<float>(one_minus_beta1);
  a.one_minus_beta2 = static_cast<float>(one_minus_beta2);
  a.key0 = static_cast<uint32_t>(key0);
  a.key1 = static_cast<uint32_t>(key1);
  a.stochastic = stochastic ? 1 : 0;
  a.param_dtype = static_cast<SrDtype>(dtypes[0]);
  a.grad_dtype = static_cast<SrDtype>(dtypes[1]);
  a.state_dtype = static_cast<SrDtype>(dtypes[2]);
  const cudaError_t err = megatron_sr::sr_adamw_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sr_adamw: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused stochastic-rounding AdamW (megatron_sr)";
  m.def("plan", &plan, "Check a chunk list and build its chunk table (CPU uint8) and tile count");
  m.def("step", &step, "One SR AdamW step over a planned chunk table (on the params' device)");
}
