// Torch binding of the fused SR AdamW kernel: checks the tensors, builds the chunk table, launches.
// Three calls so that Python can cache the device copies of the tables between steps (no host-to-device
// copy in a steady state, which also lets a CUDA graph capture the step):
//   plan(params, grads, exp_avgs, exp_avg_sqs, base_indices, weight_decays) -> (error, table, tiles, dtypes)
//   tile_map(table, tiles) -> int32 CPU tensor: the chunk of each tile
//   step(table, tile_map, tiles, dtypes, scalars, step_tensor|None, step_value, consts..., key, sr) -> error
//   signature(chunks) -> bytes | None: the cache key of a chunk list (see chunk_signature.h)
// Errors come back as strings ("" = fine) instead of C++ exceptions, and are built without iostreams: on the
// lent GPU machine a failed TORCH_CHECK, and later an error message built with std::ostringstream, crashed
// the process (cause not established), so the binding never throws and Python raises instead.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "chunk_signature.h"
#include "sr_adamw.h"

namespace {

using megatron_sr::SrAdamwChunk;
using megatron_sr::SrDtype;

bool dtype_code(const at::Tensor& t, SrDtype* out) {
  if (t.scalar_type() == at::kBFloat16) *out = megatron_sr::kBFloat16;
  else if (t.scalar_type() == at::kFloat) *out = megatron_sr::kFloat32;
  else return false;
  return true;
}

// Error text without iostreams (see the header comment): strings and integers only.
std::string piece(const char* s) { return s; }
std::string piece(const std::string& s) { return s; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
std::string piece(T v) { return std::to_string(v); }

template <typename... Args>
std::string message(const Args&... args) {
  return (std::string("sr_adamw: ") + ... + piece(args));
}

// "" when t is a contiguous CUDA tensor on `device` with `numel` elements and dtype code `dtype`.
std::string check_tensor(const at::Tensor& t, const at::Device& device, int64_t numel, SrDtype dtype,
                         const char* what, size_t i) {
  SrDtype code;
  if (!t.is_cuda() || t.device() != device) return message(what, "[", i, "] is on ", t.device().str(), ", not ", device.str());
  if (!t.is_contiguous()) return message(what, "[", i, "] is not contiguous");
  if (t.numel() != numel) return message(what, "[", i, "] has ", t.numel(), " elements, its param ", numel);
  if (!dtype_code(t, &code) || code != dtype)
    return message(what, "[", i, "] has dtype ", c10::toString(t.scalar_type()), "; one launch takes one dtype per role");
  return "";
}

std::tuple<std::string, at::Tensor, int64_t, std::vector<int64_t>> plan(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<int64_t>& base_indices, const std::vector<double>& weight_decays) {
  const size_t n = params.size();
  const at::Tensor none = at::empty({0}, at::kByte);  // a defined tensor even on errors
  if (n == 0 || grads.size() != n || exp_avgs.size() != n || exp_avg_sqs.size() != n || base_indices.size() != n ||
      weight_decays.size() != n)
    return {message("empty chunk list or lists of different lengths"), none, 0, {}};
  SrDtype pd, gd, sd;
  if (!dtype_code(params[0], &pd) || !dtype_code(grads[0], &gd) || !dtype_code(exp_avgs[0], &sd))
    return {message("params/grads/states must be bfloat16 or float32"), none, 0, {}};
  at::Tensor table = at::empty({static_cast<int64_t>(n * sizeof(SrAdamwChunk))}, at::kByte);
  auto* chunks = reinterpret_cast<SrAdamwChunk*>(table.data_ptr<uint8_t>());
  const at::Device device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const int64_t numel = p.numel();
    for (const std::string& err : {check_tensor(p, device, numel, pd, "param", i),
                                   check_tensor(g, device, numel, gd, "grad", i),
                                   check_tensor(m, device, numel, sd, "exp_avg", i),
                                   check_tensor(v, device, numel, sd, "exp_avg_sq", i)})
      if (!err.empty()) return {err, none, 0, {}};
    if (base_indices[i] < 0) return {message("base_index must be >= 0, got ", base_indices[i]), none, 0, {}};
    SrAdamwChunk& c = chunks[i];
    c.param = p.data_ptr();
    c.grad = g.data_ptr();
    c.exp_avg = m.data_ptr();
    c.exp_avg_sq = v.data_ptr();
    c.numel = numel;
    c.base_index = base_indices[i];
    c.weight_decay = static_cast<float>(weight_decays[i]);  // round to FP32 once, like the reference
    c.tile_start = 0;
    c.vector_ok = 0;
  }
  const int64_t tiles = megatron_sr::sr_adamw_plan(chunks, static_cast<int32_t>(n), pd, gd, sd);
  if (tiles > 0x7FFFFFFF) return {message("too many elements for one launch: ", tiles, " tiles"), none, 0, {}};
  return {"", table, tiles, {static_cast<int64_t>(pd), static_cast<int64_t>(gd), static_cast<int64_t>(sd)}};
}

at::Tensor tile_map(const at::Tensor& table, int64_t num_tiles) {
  at::Tensor out = at::empty({std::max<int64_t>(num_tiles, 1)}, at::kInt);
  const int64_t n = table.numel() / static_cast<int64_t>(sizeof(SrAdamwChunk));
  megatron_sr::sr_adamw_tile_map(reinterpret_cast<const SrAdamwChunk*>(table.data_ptr<uint8_t>()),
                                 static_cast<int32_t>(n), num_tiles, out.data_ptr<int32_t>());
  return out;
}

std::string step(const at::Tensor& table, const at::Tensor& tiles_to_chunks, int64_t num_tiles,
                 const std::vector<int64_t>& dtypes, const at::Tensor& scalars,
                 const c10::optional<at::Tensor>& step_tensor, int64_t step_value, double beta1, double beta2,
                 double eps, double one_minus_beta1, double one_minus_beta2, int64_t key0, int64_t key1,
                 bool stochastic) {
  const int64_t num_chunks = table.numel() / static_cast<int64_t>(sizeof(SrAdamwChunk));
  if (!table.is_cuda() || table.scalar_type() != at::kByte || !table.is_contiguous() || num_chunks == 0 ||
      !tiles_to_chunks.is_cuda() || tiles_to_chunks.scalar_type() != at::kInt ||
      tiles_to_chunks.numel() < num_tiles || dtypes.size() != 3)
    return message("chunk table and tile map must be the CUDA copies of plan() and tile_map()");
  if (!scalars.is_cuda() || scalars.device() != table.device() || scalars.scalar_type() != at::kFloat ||
      !scalars.is_contiguous() || scalars.numel() < 4)
    return message("scalars must be a contiguous float32 CUDA tensor [lr, bc1, bc2, skip] on the params' device");
  const int64_t* step_ptr = nullptr;
  if (step_tensor.has_value()) {
    const at::Tensor& s = *step_tensor;
    if (!s.is_cuda() || s.device() != table.device() || s.scalar_type() != at::kLong || s.numel() != 1)
      return message("step tensor must be a one-element int64 CUDA tensor on the params' device");
    step_ptr = s.data_ptr<int64_t>();
  }
  const c10::cuda::CUDAGuard guard(table.device());
  megatron_sr::SrAdamwParams a{};
  a.chunks = reinterpret_cast<const SrAdamwChunk*>(table.data_ptr<uint8_t>());
  a.tile_chunk = tiles_to_chunks.data_ptr<int32_t>();
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
  return err == cudaSuccess ? "" : message("kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused stochastic-rounding AdamW (megatron_sr)";
  m.def("plan", &plan, "Check a chunk list; build its chunk table (CPU uint8) and tile count; error or \"\"");
  m.def("tile_map", &tile_map, "The chunk index of each tile of a planned table (CPU int32)");
  m.def("step", &step, "One SR AdamW step over a planned chunk table on the params' device; error or \"\"");
  m.def("signature", &megatron_sr::chunk_signature,
        "Bytes that determine a chunk list's plan (pointers, sizes, dtypes, layout, base, decay), or None");
}
