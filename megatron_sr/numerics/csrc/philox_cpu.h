// Philox4x32-10 on the CPU (Salmon et al., SC 2011), shared by the C++ libraries of the project: the SR AdamW
// step (optimizer/csrc/sr_adamw_cpu.cpp) and the quantization points' uniforms (quant_uniform_cpu.cpp). The
// definition of the stream (key, counter, lanes) is megatron_sr/numerics/philox.py; this computes the same words.
// Header-only; each library that includes it lists it among the sources its build hash covers.
#pragma once
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace philox_cpu {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int64_t kPhiloxTileGroups = 64;  // groups per philox_tile call

// Philox4x32-10 of groups first..first+kPhiloxTileGroups-1 (first a multiple of kPhiloxTileGroups):
// words[4*i + w] = output word w of group i. The optimizer reads them as uint16 (element lane j of group i is
// bits16[8*i + j]: half j%2 of word j/2, as philox.py's random_bits16 defines it); the quantization points
// read one word per element (element 4*i + w is word w of group i, philox.py's uniform24_at).
#if defined(__AVX2__)
// Eight groups per 256-bit register, two registers' worth in flight (the rounds form a dependent chain;
// interleaving two chains hides the multiply latency).
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  // shuffles rather than 64-bit shifts: they run on other ports than the multiplies
  const __m256i even = _mm256_mul_epu32(a, m);                             // 64-bit products of lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xF5), m);  // of lanes 1, 3, 5, 7
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);
}

inline void store_groups8(__m256i c0, __m256i c1, __m256i c2, __m256i c3, uint32_t* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i g04 = _mm256_unpacklo_epi64(t0, t2), g15 = _mm256_unpackhi_epi64(t0, t2);  // groups 0|4, 1|5
  const __m256i g26 = _mm256_unpacklo_epi64(t1, t3), g37 = _mm256_unpackhi_epi64(t1, t3);  // groups 2|6, 3|7
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o, _mm256_permute2x128_si256(g04, g15, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(g26, g37, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(g04, g15, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(g26, g37, 0x31));
}

void philox_tile(uint64_t first, uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1, uint32_t* words) {
  static_assert(kPhiloxTileGroups % 16 == 0, "two registers of eight groups at a time");
  __m256i key0[10], key1[10];
  for (int r = 0; r < 10; ++r) {
    key0[r] = _mm256_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * kPhiloxW0));
    key1[r] = _mm256_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * kPhiloxW1));
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < kPhiloxTileGroups; i += 16) {
    // first is a multiple of kPhiloxTileGroups, so the 16 groups share their high word (2^32 is a multiple of 16)
    const uint64_t g = first + static_cast<uint64_t>(i);
    const __m256i high = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    __m256i a0[2], a1[2], a2[2], a3[2];
    for (int h = 0; h < 2; ++h) {
      a0[h] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g) + 8u * h)), lane);
      a1[h] = high;
      a2[h] = _mm256_set1_epi32(static_cast<int>(step));
      a3[h] = _mm256_set1_epi32(static_cast<int>(stream));
    }
    for (int r = 0; r < 10; ++r) {
      for (int h = 0; h < 2; ++h) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(a0[h], m0, hi0, lo0);
        mulhilo8(a2[h], m1, hi1, lo1);
        a0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, a1[h]), key0[r]);
        a2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, a3[h]), key1[r]);
        a1[h] = lo1;
        a3[h] = lo0;
      }
    }
    store_groups8(a0[0], a1[0], a2[0], a3[0], words + 4 * i);
    store_groups8(a0[1], a1[1], a2[1], a3[1], words + 4 * i + 32);
  }
}
#else
void philox_tile(uint64_t first, uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1, uint32_t* words) {
  for (int64_t i = 0; i < kPhiloxTileGroups; ++i) {
    const uint64_t g = first + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32), c2 = step, c3 = stream;
    uint32_t r0 = k0, r1 = k1;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ r0;
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ r1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      r0 += kPhiloxW0;
      r1 += kPhiloxW1;
    }
    words[4 * i] = c0;
    words[4 * i + 1] = c1;
    words[4 * i + 2] = c2;
    words[4 * i + 3] = c3;
  }
}
#endif

}  // namespace philox_cpu
