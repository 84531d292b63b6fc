// SR AdamW on the CPU over a list of chunks, bitwise equal to megatron_sr/optimizer/adamw_reference.py.
//
// Plain C++ with a C entry point (loaded by cpu_fast.py through ctypes): no torch headers, so it builds
// in a second or two and does not depend on torch's C++ ABI. Build flags matter for the contract:
// -ffp-contract=off (no fused multiply-add: every operation rounded once, as the reference's separate
// tensor ops), no -ffast-math (IEEE division and sqrt, NaN kept), -fno-math-errno and -fno-trapping-math
// (let sqrt and the NaN selects vectorise; they change no value, only whether FP exceptions may be raised).
//
// Work layout: each chunk is cut into blocks of whole Philox groups (8 consecutive stream indices; one
// Philox4x32-10 call gives the 16 rounding bits of each). Threads take blocks from a shared counter.
// Within a block, tiles of kTileGroups groups: first the random words of every rounded stream for the
// tile (AVX2 intrinsics where the CPU has them, else a scalar loop), then one vectorised pass over the
// tile's elements.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../../numerics/csrc/philox_cpu.h"

namespace {

using philox_cpu::philox_tile;

constexpr uint32_t kStreamParam = 0, kStreamExpAvg = 1, kStreamExpAvgSq = 2;
constexpr int64_t kGroup = 8;           // stream indices per Philox call
constexpr int64_t kTileGroups = philox_cpu::kPhiloxTileGroups;  // 512 elements, 1 KiB of random bits per stream
constexpr int64_t kBlockGroups = 2048;  // groups per unit of work handed to a thread (16384 elements)

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// The reference's arithmetic where its NaNs could differ from plain C++ (the values never do):
// - torch's add and sub compute fmadd(other, +-1, self), so of two NaN operands the result is the
//   *second*'s (quieted); C++'s a + b would give the first's, and the compiler may swap them anyway;
// - sqrt is sqrt_rn (FP64 sqrt, rounded): a NaN stays that NaN, a negative number gives torch's NaN.
// Multiplications and divisions need nothing: a product never has two different NaN operands in the
// formula, and a division keeps its operand order (x86 returns the first NaN, as torch's kernels do).
inline float quiet(float x) { return bits_float(float_bits(x) | 0x00400000u); }
// (each computes its result unconditionally and then selects: a loop of selects vectorises, branches do not)
inline float torch_add(float a, float b) {
  const float r = a + b;
  return b != b ? quiet(b) : r;
}
inline float torch_sub(float a, float b) {
  const float r = a - b;
  return b != b ? quiet(b) : r;
}
inline float torch_sqrt(float x, float negative) {
  const float r = std::sqrt(x);
  return x < 0.0f ? negative : r;
}

// Loads as FP32 and stores from FP32: T is float or uint16_t (BF16 bits).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bits_float(static_cast<uint32_t>(p[i]) << 16); }

// FP32 -> BF16 bits. Stochastic: add 16 random bits, truncate; a NaN stays a quiet NaN with its sign
// (rounding.py). Nearest: round half to even, a NaN becomes `nan_bits`, torch's own pattern for it
// (probed by cpu_fast.py: torch's vectorised CPU cast does not keep the sign or payload).
template <bool kStochastic>
inline uint16_t to_bf16(float x, uint16_t r16, uint16_t nan_bits) {
  const uint32_t b = float_bits(x);
  const bool nan = x != x;
  if (kStochastic) return static_cast<uint16_t>(nan ? ((b >> 16) | 0x0040u) : ((b + r16) >> 16));
  return nan ? nan_bits : static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

template <bool kStochastic>
inline void store(float* p, int64_t i, float x, uint16_t, uint16_t) { p[i] = x; }
template <bool kStochastic>
inline void store(uint16_t* p, int64_t i, float x, uint16_t r16, uint16_t nan_bits) {
  p[i] = to_bf16<kStochastic>(x, r16, nan_bits);
}

}  // namespace

extern "C" {

// One chunk, filled by cpu_fast.py (a contiguous int64/float64 table: 8 x 8 bytes per chunk).
struct SrCpuChunk {
  void* param;        // BF16 or FP32
  const void* grad;   // BF16 or FP32
  void* exp_avg;      // FP32 or BF16
  void* exp_avg_sq;   // same dtype as exp_avg
  int64_t numel;
  int64_t base_index;  // stream index of param[0] (>= 0)
  double weight_decay;  // rounded to FP32 here; 0 means no decay
  int64_t dtypes;       // bit 0: param BF16, bit 1: grad BF16, bit 2: states BF16
};

struct SrCpuStep {
  float lr, bc1, bc2;  // the per-step scalars (step_scalars), already read from their tensor
  float beta1, beta2, eps, one_minus_beta1, one_minus_beta2;
  uint32_t step, key0, key1;
  int32_t stochastic;
  uint32_t nan_bits;  // torch's BF16 pattern for a NaN under round-to-nearest
  uint32_t sqrt_negative_bits;  // the reference's sqrt of a negative number (a NaN; torch's pattern)
};

}  // extern "C"

namespace {

// Elements [lo, hi) of chunk c (offsets into its tensors), lo and hi on group boundaries of the stream
// except at the chunk's ends.
template <typename P, typename G, typename S, bool kStochastic, bool kDecay>
void update_range(const SrCpuChunk& c, const SrCpuStep& s, int64_t lo, int64_t hi) {
  constexpr bool kRoundP = kStochastic && sizeof(P) == 2;
  constexpr bool kRoundS = kStochastic && sizeof(S) == 2;
  P* param = static_cast<P*>(c.param);
  const G* grad = static_cast<const G*>(c.grad);
  S* exp_avg = static_cast<S*>(c.exp_avg);
  S* exp_avg_sq = static_cast<S*>(c.exp_avg_sq);
  const float wd = static_cast<float>(c.weight_decay);
  const float lr_wd = s.lr * wd;
  const float lr = s.lr, bc1 = s.bc1, bc2 = s.bc2, beta1 = s.beta1, beta2 = s.beta2, eps = s.eps;
  const float omb1 = s.one_minus_beta1, omb2 = s.one_minus_beta2;
  const uint16_t nan_bits = static_cast<uint16_t>(s.nan_bits);
  const float sqrt_negative = bits_float(s.sqrt_negative_bits);
  alignas(64) uint32_t rp[kTileGroups * 4], rm[kTileGroups * 4], rv[kTileGroups * 4];
  const uint16_t* rp16 = reinterpret_cast<const uint16_t*>(rp);
  const uint16_t* rm16 = reinterpret_cast<const uint16_t*>(rm);
  const uint16_t* rv16 = reinterpret_cast<const uint16_t*>(rv);
  static const uint16_t kZeros[kTileGroups * kGroup] = {};

  int64_t start = lo;
  while (start < hi) {
    // the tile: kTileGroups groups from a multiple of kTileGroups (so tiles never straddle 2^32 groups)
    const int64_t first_group = (c.base_index + start) / kGroup / kTileGroups * kTileGroups;
    const int64_t tile_end_index = (first_group + kTileGroups) * kGroup;  // stream index after this tile
    const int64_t end = std::min(hi, tile_end_index - c.base_index);
    if (kRoundP) philox_tile(first_group, s.step, kStreamParam, s.key0, s.key1, rp);
    if (kRoundS) {
      philox_tile(first_group, s.step, kStreamExpAvg, s.key0, s.key1, rm);
      philox_tile(first_group, s.step, kStreamExpAvgSq, s.key0, s.key1, rv);
    }
    // bits of element `start` sit at this offset into the tile's random arrays
    const int64_t shift = c.base_index + start - first_group * kGroup;
    const uint16_t* bp = kRoundP ? rp16 + shift : kZeros;
    const uint16_t* bm = kRoundS ? rm16 + shift : kZeros;
    const uint16_t* bv = kRoundS ? rv16 + shift : kZeros;
    P* pp = param + start;
    const G* gp = grad + start;
    S* mp = exp_avg + start;
    S* vp = exp_avg_sq + start;
    const int64_t n = end - start;
    for (int64_t i = 0; i < n; ++i) {
      float p = load(pp, i);
      const float g = load(gp, i);
      if (kDecay) p = torch_sub(p, lr_wd * p);
      const float m = torch_add(load(mp, i) * beta1, g * omb1);
      const float v = torch_add(load(vp, i) * beta2, (g * g) * omb2);
      p = torch_sub(p, lr * ((m / bc1) / (torch_sqrt(v / bc2, sqrt_negative) + eps)));
      store<kStochastic>(mp, i, m, bm[kRoundS ? i : 0], nan_bits);
      store<kStochastic>(vp, i, v, bv[kRoundS ? i : 0], nan_bits);
      store<kStochastic>(pp, i, p, bp[kRoundP ? i : 0], nan_bits);
    }
    start = end;
  }
}

using RangeFn = void (*)(const SrCpuChunk&, const SrCpuStep&, int64_t, int64_t);

template <typename P, typename G, typename S>
RangeFn pick_rounding(bool stochastic, bool decay) {
  if (stochastic) return decay ? update_range<P, G, S, true, true> : update_range<P, G, S, true, false>;
  return decay ? update_range<P, G, S, false, true> : update_range<P, G, S, false, false>;
}

RangeFn pick(int64_t dtypes, bool stochastic, bool decay) {
  switch (dtypes & 7) {
    case 0: return pick_rounding<float, float, float>(stochastic, decay);
    case 1: return pick_rounding<uint16_t, float, float>(stochastic, decay);
    case 2: return pick_rounding<float, uint16_t, float>(stochastic, decay);
    case 3: return pick_rounding<uint16_t, uint16_t, float>(stochastic, decay);
    case 4: return pick_rounding<float, float, uint16_t>(stochastic, decay);
    case 5: return pick_rounding<uint16_t, float, uint16_t>(stochastic, decay);
    case 6: return pick_rounding<float, uint16_t, uint16_t>(stochastic, decay);
    default: return pick_rounding<uint16_t, uint16_t, uint16_t>(stochastic, decay);
  }
}

struct Block {
  int32_t chunk;
  int64_t lo, hi;
};

// Blocks of about kBlockGroups groups, cut on the stream's group boundaries.
std::vector<Block> cut_blocks(const SrCpuChunk* chunks, int32_t num_chunks) {
  std::vector<Block> blocks;
  const int64_t block_elements = kBlockGroups * kGroup;
  for (int32_t k = 0; k < num_chunks; ++k) {
    const SrCpuChunk& c = chunks[k];
    int64_t lo = 0;
    while (lo < c.numel) {
      const int64_t boundary = ((c.base_index + lo) / block_elements + 1) * block_elements - c.base_index;
      const int64_t hi = std::min(c.numel, boundary);
      blocks.push_back({k, lo, hi});
      lo = hi;
    }
  }
  return blocks;
}

}  // namespace

extern "C" {

// Version of the table layout above; cpu_fast.py refuses a library whose version differs.
int32_t sr_adamw_cpu_abi() { return 2; }

// One AdamW step over num_chunks chunks with up to num_threads threads (the caller's thread included).
void sr_adamw_cpu_step(const SrCpuChunk* chunks, int32_t num_chunks, const SrCpuStep* step, int32_t num_threads) {
  const std::vector<Block> blocks = cut_blocks(chunks, num_chunks);
  const SrCpuStep s = *step;
  const bool stochastic = s.stochastic != 0;
  std::atomic<size_t> next{0};
  auto work = [&]() {
    for (size_t b = next++; b < blocks.size(); b = next++) {
      const Block& blk = blocks[b];
      const SrCpuChunk& c = chunks[blk.chunk];
      pick(c.dtypes, stochastic, static_cast<float>(c.weight_decay) != 0.0f)(c, s, blk.lo, blk.hi);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max(num_threads, 1) - 1, static_cast<int64_t>(blocks.size()) - 1);
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < helpers; ++t) {
    try {
      threads.emplace_back(work);
    } catch (...) {  // no thread to be had: the threads that started (and this one) do all the blocks
      break;
    }
  }
  work();
  for (auto& t : threads) t.join();
}

}  // extern "C"
