// The quantization points' uniforms on the CPU, bitwise equal to megatron_sr/numerics/philox.py's uniform24_at.
//
// For a local [rows, width] view of a tensor whose element (r, c) sits at index
// (first_row + r) * full_width + col_offset + c of the unsharded tensor, out[r * width + c] =
// (word (index % 4) of Philox4x32-10(counter = (index / 4, step, stream), key)) >> 8, times 2^-24.
// Rows are cut into blocks that threads take from a shared counter; within a row, the Philox tiles that cover
// its index range are computed once each (philox_cpu.h) and their words copied out.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include "philox_cpu.h"

namespace {

constexpr int64_t kTileElements = philox_cpu::kPhiloxTileGroups * 4;  // one word per element
constexpr int64_t kRowsPerBlock = 8;

struct Rows {
  float* out;
  int64_t rows, width, first_row, full_width, col_offset;
  uint32_t step, stream, k0, k1;
};

// One row; `words` holds the tile `cached` (-1: none), kept across the rows of a block, since narrow rows share tiles.
void fill_row(const Rows& a, int64_t r, uint32_t* words, int64_t& cached) {
  const int64_t base = (a.first_row + r) * a.full_width + a.col_offset;  // index of element (r, 0)
  float* out = a.out + r * a.width;
  int64_t c = 0;
  while (c < a.width) {
    const int64_t index = base + c;
    const int64_t tile = index / kTileElements;  // tiles start at multiples of kPhiloxTileGroups groups
    if (tile != cached) {
      philox_cpu::philox_tile(static_cast<uint64_t>(tile) * philox_cpu::kPhiloxTileGroups, a.step, a.stream, a.k0,
                              a.k1, words);
      cached = tile;
    }
    const int64_t offset = index - tile * kTileElements;
    const int64_t n = std::min(a.width - c, kTileElements - offset);
    for (int64_t j = 0; j < n; ++j) out[c + j] = static_cast<float>(words[offset + j] >> 8) * 0x1p-24f;
    c += n;
  }
}

}  // namespace

extern "C" {

int32_t quant_uniform_cpu_abi() { return 1; }

void quant_uniform24_rows(float* out, int64_t rows, int64_t width, int64_t first_row, int64_t full_width,
                          int64_t col_offset, uint32_t step, uint32_t stream, uint32_t k0, uint32_t k1,
                          int32_t num_threads) {
  const Rows a{out, rows, width, first_row, full_width, col_offset, step, stream, k0, k1};
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    alignas(64) uint32_t words[kTileElements];
    for (int64_t b = next++; b < blocks; b = next++) {
      int64_t cached = -1;
      for (int64_t r = b * kRowsPerBlock; r < std::min(rows, (b + 1) * kRowsPerBlock); ++r) fill_row(a, r, words, cached);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max(num_threads, 1) - 1, blocks - 1);
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < helpers; ++t) {
    try {
      threads.emplace_back(work);
    } catch (...) {  // no thread to be had: the others do the blocks
      break;
    }
  }
  work();
  for (auto& t : threads) t.join();
}

}  // extern "C"
