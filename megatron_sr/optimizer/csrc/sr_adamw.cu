// Fused stochastic-rounding AdamW over a list of chunks, one launch, bitwise equal to
// megatron_sr/optimizer/adamw_reference.py.
//
// Work layout: a chunk covers the Philox groups (8 consecutive stream indices) that its elements
// touch; a thread owns whole groups, so each group costs exactly one Philox call per rounded
// stream. Each chunk's groups are cut into tiles of kTileGroups; one block per tile, and a block
// finds its chunk in a tile -> chunk table (a binary search here cost ~15% of the bandwidth with
// ~300 chunks: its dependent loads stall every block's start). Full groups of a chunk whose
// pointers allow it use 16-byte loads and stores; the partial first and last group (and chunks
// with unaligned pointers) use scalar accesses. Arithmetic uses the __f*_rn intrinsics so that
// nothing is contracted into FMAs: every operation is rounded once, as in the reference.
#include "sr_adamw.h"

#include <cuda_bf16.h>

namespace megatron_sr {
namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kStreamParam = 0, kStreamExpAvg = 1, kStreamExpAvgSq = 2;

// Philox4x32-10, counter = (group lo, group hi, step lo, stream), key = (k0, k1).
__device__ __forceinline__ uint4 philox(uint64_t group, uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32), c2 = step, c3 = stream;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = __umulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = __umulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return make_uint4(c0, c1, c2, c3);
}

// 16 random bits of lane j (0..7): half j%2 (0 = low) of word j/2.
__device__ __forceinline__ uint32_t lane_bits(const uint4& w, int j) {
  const uint32_t word = (j >> 1) == 0 ? w.x : (j >> 1) == 1 ? w.y : (j >> 1) == 2 ? w.z : w.w;
  return (j & 1) ? (word >> 16) : (word & 0xFFFFu);
}

// FP32 -> BF16 bits: stochastic (add-then-truncate, NaN kept as a quiet NaN with its sign) or nearest even.
__device__ __forceinline__ uint16_t to_bf16(float x, uint32_t r16, bool stochastic) {
  if (stochastic) {
    const uint32_t b = __float_as_uint(x);
    return static_cast<uint16_t>(isnan(x) ? ((b >> 16) | 0x0040u) : ((b + r16) >> 16));
  }
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

__device__ __forceinline__ float bf16_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// ---- loads and stores of 8 elements (vector) or of one element (scalar) as FP32 ----
template <typename T> struct Access;

template <> struct Access<float> {
  static constexpr int kBytes = 4;
  __device__ static void load8(const void* base, int64_t off, float (&x)[8]) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + off);
    const float4 a = __ldcs(p), b = __ldcs(p + 1);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  }
  __device__ static float load1(const void* base, int64_t off) { return static_cast<const float*>(base)[off]; }
  __device__ static void store8(void* base, int64_t off, const float (&x)[8], const uint4&, bool) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + off);
    __stcs(p, make_float4(x[0], x[1], x[2], x[3]));
    __stcs(p + 1, make_float4(x[4], x[5], x[6], x[7]));
  }
  __device__ static void store1(void* base, int64_t off, float x, uint32_t, bool) {
    static_cast<float*>(base)[off] = x;
  }
};

template <> struct Access<__nv_bfloat16> {
  static constexpr int kBytes = 2;
  __device__ static void load8(const void* base, int64_t off, float (&x)[8]) {
    const uint4 u = __ldcs(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + off));
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = bf16_to_float(w[i] & 0xFFFFu);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
  __device__ static float load1(const void* base, int64_t off) {
    return bf16_to_float(static_cast<const uint16_t*>(base)[off]);
  }
  __device__ static void store8(void* base, int64_t off, const float (&x)[8], const uint4& r, bool stochastic) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = to_bf16(x[2 * i], lane_bits(r, 2 * i), stochastic);
      const uint32_t hi = to_bf16(x[2 * i + 1], lane_bits(r, 2 * i + 1), stochastic);
      w[i] = lo | (hi << 16);
    }
    __stcs(reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + off), make_uint4(w[0], w[1], w[2], w[3]));
  }
  __device__ static void store1(void* base, int64_t off, float x, uint32_t r16, bool stochastic) {
    static_cast<uint16_t*>(base)[off] = to_bf16(x, r16, stochastic);
  }
};

template <typename T> constexpr bool kIsBf16 = Access<T>::kBytes == 2;

struct StepConsts {
  float lr, bc1, bc2, lr_wd, beta1, beta2, eps, omb1, omb2;
  bool decay;
};

// The reference's per-element math, operation by operation, each rounded once.
__device__ __forceinline__ void adamw_math(const StepConsts& k, float& p, float g, float& m, float& v) {
  if (k.decay) p = __fsub_rn(p, __fmul_rn(k.lr_wd, p));
  m = __fadd_rn(__fmul_rn(m, k.beta1), __fmul_rn(g, k.omb1));
  v = __fadd_rn(__fmul_rn(v, k.beta2), __fmul_rn(__fmul_rn(g, g), k.omb2));
  const float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(v, k.bc2)), k.eps);
  p = __fsub_rn(p, __fmul_rn(k.lr, __fdiv_rn(__fdiv_rn(m, k.bc1), denom)));
}

template <typename P, typename G, typename S>
__global__ void __launch_bounds__(kThreads) sr_adamw_kernel(const SrAdamwParams a) {
  if (a.scalars[3] != 0.0f) return;  // skip, decided on the device (non-finite gradients): nothing changes
  const int64_t tile = blockIdx.x;
  const SrAdamwChunk c = a.chunks[a.tile_chunk[tile]];  // two dependent loads; a search would take ~log2(n)

  StepConsts k;
  k.lr = a.scalars[0];
  k.bc1 = a.scalars[1];
  k.bc2 = a.scalars[2];
  k.lr_wd = __fmul_rn(k.lr, c.weight_decay);
  k.decay = c.weight_decay != 0.0f;
  k.beta1 = a.beta1; k.beta2 = a.beta2; k.eps = a.eps; k.omb1 = a.one_minus_beta1; k.omb2 = a.one_minus_beta2;
  const uint32_t step = static_cast<uint32_t>(a.step_ptr ? *a.step_ptr : a.step_value);
  const bool stochastic = a.stochastic != 0;

  const int64_t first_group = c.base_index >> 3;
  const int64_t num_groups = ((c.base_index + c.numel - 1) >> 3) - first_group + 1;
  const int64_t tile_in_chunk = tile - c.tile_start;

#pragma unroll
  for (int it = 0; it < kGroupsPerThread; ++it) {
    const int64_t gi = tile_in_chunk * kTileGroups + it * kThreads + threadIdx.x;
    if (gi >= num_groups) break;
    const uint64_t group = static_cast<uint64_t>(first_group + gi);
    const int64_t off0 = static_cast<int64_t>(group) * kElementsPerGroup - c.base_index;  // lane 0's offset
    const bool full = c.vector_ok && off0 >= 0 && off0 + kElementsPerGroup <= c.numel;

    float p[8], g[8], m[8], v[8];
    if (full) {
      Access<P>::load8(c.param, off0, p);
      Access<G>::load8(c.grad, off0, g);
      Access<S>::load8(c.exp_avg, off0, m);
      Access<S>::load8(c.exp_avg_sq, off0, v);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t o = off0 + j;
        const bool in = o >= 0 && o < c.numel;
        p[j] = in ? Access<P>::load1(c.param, o) : 0.0f;
        g[j] = in ? Access<G>::load1(c.grad, o) : 0.0f;
        m[j] = in ? Access<S>::load1(c.exp_avg, o) : 0.0f;
        v[j] = in ? Access<S>::load1(c.exp_avg_sq, o) : 0.0f;
      }
    }

#pragma unroll
    for (int j = 0; j < 8; ++j) adamw_math(k, p[j], g[j], m[j], v[j]);

    uint4 rp = make_uint4(0, 0, 0, 0), rm = rp, rv = rp;
    if (stochastic) {
      if (kIsBf16<P>) rp = philox(group, step, kStreamParam, a.key0, a.key1);
      if (kIsBf16<S>) {
        rm = philox(group, step, kStreamExpAvg, a.key0, a.key1);
        rv = philox(group, step, kStreamExpAvgSq, a.key0, a.key1);
      }
    }

    if (full) {
      Access<S>::store8(c.exp_avg, off0, m, rm, stochastic);
      Access<S>::store8(c.exp_avg_sq, off0, v, rv, stochastic);
      Access<P>::store8(c.param, off0, p, rp, stochastic);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t o = off0 + j;
        if (o < 0 || o >= c.numel) continue;
        Access<S>::store1(c.exp_avg, o, m[j], lane_bits(rm, j), stochastic);
        Access<S>::store1(c.exp_avg_sq, o, v[j], lane_bits(rv, j), stochastic);
        Access<P>::store1(c.param, o, p[j], lane_bits(rp, j), stochastic);
      }
    }
  }
}

int element_bytes(SrDtype t) { return t == kBFloat16 ? 2 : 4; }

bool aligned_at(const void* ptr, int64_t elements, int bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(elements * bytes)) % 16 == 0;
}

template <typename P, typename G, typename S>
cudaError_t launch_typed(const SrAdamwParams& a, cudaStream_t stream) {
  sr_adamw_kernel<P, G, S><<<static_cast<unsigned>(a.num_tiles), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename P, typename G>
cudaError_t launch_states(const SrAdamwParams& a, cudaStream_t stream) {
  return a.state_dtype == kBFloat16 ? launch_typed<P, G, __nv_bfloat16>(a, stream) : launch_typed<P, G, float>(a, stream);
}

template <typename P>
cudaError_t launch_grads(const SrAdamwParams& a, cudaStream_t stream) {
  return a.grad_dtype == kBFloat16 ? launch_states<P, __nv_bfloat16>(a, stream) : launch_states<P, float>(a, stream);
}

}  // namespace

int64_t sr_adamw_plan(SrAdamwChunk* chunks, int32_t num_chunks, SrDtype param_dtype, SrDtype grad_dtype,
                      SrDtype state_dtype) {
  int64_t tiles = 0;
  for (int32_t i = 0; i < num_chunks; ++i) {
    SrAdamwChunk& c = chunks[i];
    c.tile_start = tiles;
    c.vector_ok = 0;
    if (c.numel <= 0) continue;
    // elements before the first group boundary: full groups start at head, head + 8, ...
    const int64_t head = (kElementsPerGroup - c.base_index % kElementsPerGroup) % kElementsPerGroup;
    c.vector_ok = aligned_at(c.param, head, element_bytes(param_dtype)) &&
                  aligned_at(c.grad, head, element_bytes(grad_dtype)) &&
                  aligned_at(c.exp_avg, head, element_bytes(state_dtype)) &&
                  aligned_at(c.exp_avg_sq, head, element_bytes(state_dtype));
    const int64_t first_group = c.base_index / kElementsPerGroup;
    const int64_t groups = (c.base_index + c.numel - 1) / kElementsPerGroup - first_group + 1;
    tiles += (groups + kTileGroups - 1) / kTileGroups;
  }
  return tiles;
}

void sr_adamw_tile_map(const SrAdamwChunk* chunks, int32_t num_chunks, int64_t num_tiles, int32_t* out) {
  for (int32_t i = 0; i < num_chunks; ++i) {
    const int64_t end = i + 1 < num_chunks ? chunks[i + 1].tile_start : num_tiles;
    for (int64_t t = chunks[i].tile_start; t < end; ++t) out[t] = i;
  }
}

cudaError_t sr_adamw_launch(const SrAdamwParams& a, cudaStream_t stream) {
  if (a.num_tiles == 0) return cudaSuccess;
  if (a.num_tiles < 0 || a.num_tiles > 0x7FFFFFFF || a.num_chunks <= 0 || !a.tile_chunk) return cudaErrorInvalidValue;
  return a.param_dtype == kBFloat16 ? launch_grads<__nv_bfloat16>(a, stream) : launch_grads<float>(a, stream);
}

}  // namespace megatron_sr
