// Parallel loops of the elementwise CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace genfast::cpu {

// Calls body(row, first column, end column) for every tile of a (rows, width) array, in
// parallel. Tasks are tiles of a row, so long rows split and short rows batch.
template <typename Body>
void for_each_tile(int64_t rows, int64_t width, Body&& body) {
  constexpr int64_t kTile = 4096;            // elements of a row per task at most
  constexpr int64_t kTaskElements = 1 << 14;  // elements per parallel chunk at least
  const int64_t tiles_per_row = (width + kTile - 1) / kTile;
  const int64_t tile = std::min(width, kTile);
  at::parallel_for(0, rows * tiles_per_row, std::max<int64_t>(1, kTaskElements / tile), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t / tiles_per_row, first = t % tiles_per_row * kTile;
      body(row, first, std::min(width, first + kTile));
    }
  });
}

}  // namespace genfast::cpu
