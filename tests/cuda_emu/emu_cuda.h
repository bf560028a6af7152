// A tiny CUDA emulator: runs the library's real kernels (csrc/cuda/*_kernels.cuh) on the CPU, so
// that their indexing, shared-memory tiling, barriers and warp collectives are tested on machines
// without a GPU. Each block runs as kBlock cooperative fibers (ucontext) on one OS thread;
// __syncthreads and the warp collectives (__ballot_sync, __shfl_xor_sync, the m16n8k256 b1 MMA)
// are points where a fiber yields to the scheduler. __shared__ variables become function-local
// statics (blocks run one after another), the dynamic shared memory is a per-launch buffer.
// The MMA is emulated from the PTX ISA's fragment layout for mma.m16n8k256 .b1: that layout is
// the one assumption this emulator cannot check.
#pragma once

#include <ucontext.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define SPARKS_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define SPARKS_DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_shared()

struct uint4 { uint32_t x, y, z, w; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
struct Dim3 { unsigned int x = 1, y = 1, z = 1; };

namespace emu {

inline Dim3 threadIdx, blockIdx, blockDim, gridDim;

enum class State { Ready, Barrier, Done };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = State::Ready;
};

inline std::vector<Fiber> fibers;
inline ucontext_t scheduler_ctx;
inline int current = 0;
inline std::vector<unsigned char> shared_buffer;
inline std::function<void()> body;
// Warp collectives: per lane, per parity (a lane may run one collective ahead of a slower lane).
inline std::vector<uint32_t> deposit_u32[2];
inline std::vector<std::array<uint32_t, 6>> deposit_mma[2];
inline std::vector<int> parity;

inline unsigned char* dynamic_shared() { return shared_buffer.data(); }

inline void yield(State s) {
  fibers[current].state = s;
  swapcontext(&fibers[current].ctx, &scheduler_ctx);
}

inline void fiber_main() {
  body();
  fibers[current].state = State::Done;
  swapcontext(&fibers[current].ctx, &scheduler_ctx);
}

inline void resume(int i, unsigned int block_threads) {
  current = i;
  threadIdx.x = static_cast<unsigned int>(i) % block_threads;
  fibers[i].state = State::Ready;
  swapcontext(&scheduler_ctx, &fibers[i].ctx);
}

// Runs `kernel` for every block of a 1-D block shape and a 1- or 2-D grid.
inline void launch(Dim3 grid, unsigned int threads, size_t smem, const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = Dim3{threads, 1, 1};
  shared_buffer.assign(smem + 16, 0xCD);  // garbage, as on a GPU
  body = kernel;
  for (unsigned int by = 0; by < grid.y; ++by) {
    for (unsigned int bx = 0; bx < grid.x; ++bx) {
      blockIdx = Dim3{bx, by, 1};
      fibers.resize(threads);
      for (int p = 0; p < 2; ++p) {
        deposit_u32[p].assign(threads, 0);
        deposit_mma[p].assign(threads, {});
      }
      parity.assign(threads, 0);
      for (unsigned int t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        f.state = State::Ready;
        f.stack.resize(64 * 1024);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
      }
      // Passes: resume every fiber that is not parked at the barrier; a collective yields as
      // Ready, so its warp completes it in the next pass. When only barrier-parked (or finished)
      // fibers remain, the barrier opens.
      for (;;) {
        bool any_ready = false;
        for (unsigned int t = 0; t < threads; ++t)
          if (fibers[t].state == State::Ready) { any_ready = true; resume(static_cast<int>(t), threads); }
        if (any_ready) continue;
        bool any_barrier = false;
        for (auto& f : fibers)
          if (f.state == State::Barrier) { f.state = State::Ready; any_barrier = true; }
        if (!any_barrier) break;
      }
    }
  }
}

inline int lane() { return current % 32; }
inline int warp_base() { return current - current % 32; }

}  // namespace emu

using emu::blockDim;
using emu::blockIdx;
using emu::gridDim;
using emu::threadIdx;

inline void __syncthreads() { emu::yield(emu::State::Barrier); }

inline uint32_t __ballot_sync(uint32_t, bool pred) {
  const int p = emu::parity[emu::current];
  emu::deposit_u32[p][emu::current] = pred ? 1u : 0u;
  emu::yield(emu::State::Ready);  // every lane deposits before anyone reads
  uint32_t word = 0;
  for (int l = 0; l < 32; ++l) word |= emu::deposit_u32[p][emu::warp_base() + l] << l;
  emu::parity[emu::current] ^= 1;
  return word;
}

inline int __shfl_xor_sync(uint32_t, int value, int lane_mask) {
  const int p = emu::parity[emu::current];
  emu::deposit_u32[p][emu::current] = static_cast<uint32_t>(value);
  emu::yield(emu::State::Ready);
  const int v = static_cast<int>(emu::deposit_u32[p][emu::warp_base() + (emu::lane() ^ lane_mask)]);
  emu::parity[emu::current] ^= 1;
  return v;
}

// mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc, PTX ISA fragment layout:
// lane = 4 * gid + tig; A regs {row gid word tig, row gid+8 word tig, row gid word tig+4,
// row gid+8 word tig+4}; B regs {col gid word tig, col gid word tig+4};
// D regs {(gid, 2tig), (gid, 2tig+1), (gid+8, 2tig), (gid+8, 2tig+1)}.
inline void emulated_mma_and_popc(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int p = emu::parity[emu::current];
  emu::deposit_mma[p][emu::current] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  emu::yield(emu::State::Ready);
  uint32_t A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const auto& r = emu::deposit_mma[p][emu::warp_base() + l];
    const int gid = l / 4, tig = l % 4;
    A[gid][tig] = r[0];
    A[gid + 8][tig] = r[1];
    A[gid][tig + 4] = r[2];
    A[gid + 8][tig + 4] = r[3];
    B[gid][tig] = r[4];
    B[gid][tig + 4] = r[5];
  }
  const int gid = emu::lane() / 4, tig = emu::lane() % 4;
  const int rows[4] = {gid, gid, gid + 8, gid + 8};
  const int cols[4] = {2 * tig, 2 * tig + 1, 2 * tig, 2 * tig + 1};
  for (int i = 0; i < 4; ++i) {
    int32_t sum = 0;
    for (int w = 0; w < 8; ++w) sum += __builtin_popcount(A[rows[i]][w] & B[cols[i]][w]);
    d[i] += sum;
  }
  emu::parity[emu::current] ^= 1;
}

inline int __popc(uint32_t x) { return __builtin_popcount(x); }
inline int __popcll(uint64_t x) { return __builtin_popcountll(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
