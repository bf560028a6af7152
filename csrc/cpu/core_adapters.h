// The ATen side of the core's callbacks (kernel_core.h): threads from at::parallel_for, result
// tiles into the output transform.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <functional>

#include "kernel_core.h"
#include "output_transform.h"

namespace sparks {
namespace cpu {

// core::ParallelFor over at::parallel_for; ranges of at least `grain` items go to one thread.
inline core::ParallelFor aten_parallel(int64_t grain = 1) {
  return [grain](int64_t items, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { body(begin, end); });
  };
}

inline core::TileStore tile_store(const OutputTransform& writer) {
  return [&writer](const int32_t* tile, int64_t ld, int64_t n, int64_t p0, int64_t rows, int64_t co0,
                   int64_t cols) { writer.store(tile, ld, n, p0, rows, co0, cols); };
}

}  // namespace cpu
}  // namespace sparks
