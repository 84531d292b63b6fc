// Fused stochastic-rounding AdamW: the launch interface shared by the kernel (sr_adamw.cu) and the
// torch binding (binding.cpp). No torch headers here, so the kernel file compiles with plain nvcc.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace megatron_sr {

enum SrDtype : int32_t { kFloat32 = 0, kBFloat16 = 1 };

constexpr int kThreads = 256;          // threads per block
#ifndef SR_ADAMW_GROUPS_PER_THREAD
#define SR_ADAMW_GROUPS_PER_THREAD 4
#endif
constexpr int kGroupsPerThread = SR_ADAMW_GROUPS_PER_THREAD;  // Philox groups (8 elements) per thread per tile
constexpr int kTileGroups = kThreads * kGroupsPerThread;
constexpr int kElementsPerGroup = 8;   // one Philox4x32 call = 128 bits = 8 x 16 rounding bits

// One contiguous 1-D piece of a parameter. Filled on the host, copied to the device, read by the kernel.
struct alignas(16) SrAdamwChunk {
  void* param;             // BF16 or FP32, updated in place
  const void* grad;        // BF16 or FP32
  void* exp_avg;           // FP32 or BF16
  void* exp_avg_sq;        // same dtype as exp_avg
  int64_t numel;
  int64_t base_index;      // random-stream index of param[0] (>= 0)
  int64_t tile_start;      // first tile of this chunk in the launch (set by sr_adamw_plan)
  float weight_decay;      // already rounded to FP32; 0 means no decay
  int32_t vector_ok;       // 1 when every full group sits on 16-byte boundaries (set by sr_adamw_plan)
};
static_assert(sizeof(SrAdamwChunk) == 64, "SrAdamwChunk layout is part of the binding contract");

struct SrAdamwParams {
  const SrAdamwChunk* chunks;  // device memory, num_chunks entries, planned by sr_adamw_plan
  const int32_t* tile_chunk;   // device memory, num_tiles entries: the chunk of each tile (sr_adamw_tile_map)
  int32_t num_chunks;
  int64_t num_tiles;
  const float* scalars;        // device FP32 [lr, bc1, bc2, skip]: skip != 0 leaves every tensor unchanged
  const int64_t* step_ptr;     // device int64 step, or nullptr to use step_value
  int64_t step_value;
  float beta1, beta2, eps, one_minus_beta1, one_minus_beta2;
  uint32_t key0, key1;
  int32_t stochastic;          // 1: stochastic rounding, 0: round to nearest even
  SrDtype param_dtype, grad_dtype, state_dtype;
};

// Host: fills tile_start and vector_ok of each chunk; returns the number of tiles (blocks) to launch.
int64_t sr_adamw_plan(SrAdamwChunk* chunks, int32_t num_chunks, SrDtype param_dtype, SrDtype grad_dtype,
                      SrDtype state_dtype);

// Host: out[t] = index of the chunk that tile t belongs to, for t < num_tiles (planned chunks).
void sr_adamw_tile_map(const SrAdamwChunk* chunks, int32_t num_chunks, int64_t num_tiles, int32_t* out);

// Host: one launch for every chunk on `stream`. Returns the launch error, if any.
cudaError_t sr_adamw_launch(const SrAdamwParams& params, cudaStream_t stream);

}  // namespace megatron_sr
