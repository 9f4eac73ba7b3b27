// A small CPU emulator of the CUDA subset used in csrc/ (compile with -DWF_EMULATE).
//
// Purpose: run the real kernel and launcher code on a machine without a GPU, to test
// index arithmetic, bounds, shared-memory sizing and barrier placement. It is not a
// performance model. Each CTA runs its threads as cooperative fibers (ucontext); between
// two barriers the ready threads run one after another in a random order (seed from
// WF_EMU_SEED), so a missing __syncthreads tends to change results from run to run.
// It aborts on: __syncthreads reached by only part of a CTA, divergent warp
// barriers/shuffles, partial warps, too much dynamic shared memory for the kernel's
// attribute (48 KiB by default, like CUDA), grids/blocks beyond CUDA's limits.
// Dynamic shared memory starts filled with NaN bytes to expose reads before writes.
// WF_EMU_MAX_GRID=n caps gridDim.x at n (every kernel here loops grid-stride).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 { unsigned x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9, cudaErrorNoDevice = 100,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8, cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4,
};
typedef struct emu_stream_st* cudaStream_t;

namespace emu {

constexpr int kWarpSize = 32;
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kOptinSmem = 232448;  // sm_90: 227 KiB per block after opt-in
constexpr size_t kStackBytes = 128 * 1024;
enum State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  unsigned tid = 0;
  State state = kReady;
};

struct Cta {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::vector<unsigned char> smem;
  std::vector<uint64_t> shfl;
  std::function<void()> body;
};

inline Cta& cta() { static Cta c; return c; }
inline cudaError_t& last_error() { static cudaError_t e = cudaSuccess; return e; }
inline std::map<const void*, int>& smem_attr() { static std::map<const void*, int> m; return m; }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::abort();
}

inline uint3 thread_idx() { return {cta().current->tid, 0, 0}; }
inline uint3 block_idx() { return cta().block_idx; }
inline dim3 block_dim() { return cta().block_dim; }
inline dim3 grid_dim() { return cta().grid_dim; }
inline void* dynamic_smem() { return cta().smem.empty() ? nullptr : cta().smem.data(); }

inline void wait(State s) {
  Cta& c = cta();
  c.current->state = s;
  swapcontext(&c.current->ctx, &c.scheduler);
}
inline void syncthreads() { wait(kBlockBarrier); }
inline void syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks are emulated");
  wait(kWarpBarrier);
}

// Every lane publishes v, then reads the value of lane src_lane(own lane).
template <class T, class SrcLane>
T shuffle(unsigned mask, T v, SrcLane src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a large type");
  Cta& c = cta();
  const unsigned tid = c.current->tid;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  c.shfl[tid] = bits;
  syncwarp(mask);
  const unsigned src = (tid & ~31u) | src_lane(tid & 31u);
  T out;
  std::memcpy(&out, &c.shfl[src], sizeof(T));
  syncwarp(mask);
  return out;
}

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  if (lane_mask < 0 || lane_mask >= kWarpSize) fail("shuffle lane mask out of range");
  return shuffle(mask, v, [&](unsigned lane) { return lane ^ static_cast<unsigned>(lane_mask); });
}

template <class T>
T shfl_idx(unsigned mask, T v, int src_lane) {
  if (src_lane < 0 || src_lane >= kWarpSize) fail("shuffle source lane out of range");
  return shuffle(mask, v, [&](unsigned) { return static_cast<unsigned>(src_lane); });
}

inline void fiber_main() {
  Cta& c = cta();
  c.body();
  c.current->state = kDone;  // returning switches to uc_link (the scheduler)
}

inline std::mt19937& rng() {
  static std::mt19937 g([] {
    const char* s = std::getenv("WF_EMU_SEED");
    return static_cast<unsigned>(s ? std::strtoul(s, nullptr, 10) : 12345u);
  }());
  return g;
}

// Release the barriers that every thread concerned has reached; abort on a deadlock.
// Of the warps waiting at a warp barrier only a random non-empty subset moves on, so
// warps drift apart by random numbers of steps, as they may on a GPU.
inline bool release(Cta& c) {
  const size_t n = c.fibers.size();
  bool all_done = true, all_block = true;
  std::vector<size_t> waiting;
  for (size_t w = 0; w < n; w += kWarpSize) {
    int at_warp = 0;
    for (size_t i = w; i < w + kWarpSize; ++i) at_warp += c.fibers[i].state == kWarpBarrier;
    if (at_warp == kWarpSize) {
      waiting.push_back(w);
    } else if (at_warp > 0) {
      fail("warp barrier / shuffle reached by only part of a warp");
    }
  }
  if (!waiting.empty()) {
    const size_t keep = waiting[rng()() % waiting.size()];
    for (size_t w : waiting) {
      if (w != keep && rng()() % 2 == 0) continue;
      for (size_t i = w; i < w + kWarpSize; ++i) c.fibers[i].state = kReady;
    }
    return true;
  }
  for (auto& f : c.fibers) {
    all_done = all_done && f.state == kDone;
    all_block = all_block && f.state == kBlockBarrier;
  }
  if (all_done) return false;
  if (!all_block) fail("__syncthreads reached by only part of the block (or after an exit)");
  for (auto& f : c.fibers) f.state = kReady;
  return true;
}

inline void run_cta(unsigned nthreads, size_t smem_bytes) {
  Cta& c = cta();
  c.fibers.assign(nthreads, Fiber{});
  if (c.stacks.size() < nthreads) c.stacks.resize(nthreads, std::vector<char>(kStackBytes));
  c.smem.assign(smem_bytes, 0xff);  // NaN pattern; exact size for AddressSanitizer
  c.shfl.assign(nthreads, 0);
  for (unsigned t = 0; t < nthreads; ++t) {
    Fiber& f = c.fibers[t];
    f.tid = t;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = c.stacks[t].data();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &c.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<unsigned> order;
  do {
    order.clear();
    for (unsigned t = 0; t < nthreads; ++t)
      if (c.fibers[t].state == kReady) order.push_back(t);
    std::shuffle(order.begin(), order.end(), rng());
    for (unsigned t : order) {
      c.current = &c.fibers[t];
      swapcontext(&c.scheduler, &c.fibers[t].ctx);
    }
  } while (release(c));
}

template <class... KArgs, class... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t, Args&&... args) {
  auto it = smem_attr().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = it == smem_attr().end() ? kDefaultSmem : it->second;
  if (block.x == 0 || block.x > 1024 || block.x % kWarpSize != 0 || block.y != 1 ||
      block.z != 1 || grid.x == 0 || grid.x > 0x7fffffffu || grid.y != 1 || grid.z != 1 ||
      smem > allowed) {
    std::fprintf(stderr, "cuda_emu: bad launch grid=%u block=%u smem=%zu (allowed %zu)\n",
                 grid.x, block.x, smem, allowed);
    return last_error() = cudaErrorInvalidConfiguration;
  }
  // WF_EMU_MAX_GRID caps gridDim.x so that grid-stride loops run more than once.
  if (const char* cap = std::getenv("WF_EMU_MAX_GRID")) {
    const unsigned long m = std::strtoul(cap, nullptr, 10);
    if (m > 0 && m < grid.x) grid.x = static_cast<unsigned>(m);
  }
  std::tuple<KArgs...> targs(static_cast<KArgs>(args)...);
  Cta& c = cta();
  c.body = [&] { std::apply(kernel, targs); };
  c.block_dim = block;
  c.grid_dim = grid;
  for (unsigned b = 0; b < grid.x; ++b) {
    c.block_idx = {b, 0, 0};
    run_cta(block.x, smem);
  }
  return cudaSuccess;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define __syncthreads() ::emu::syncthreads()
#define __syncwarp() ::emu::syncwarp(0xffffffffu)
#define __shfl_xor_sync(mask, v, m) ::emu::shfl_xor((mask), (v), (m))
#define __shfl_sync(mask, v, lane) ::emu::shfl_idx((mask), (v), (lane))

// Runtime API subset (one emulated sm_90 device, host memory as device memory).
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::kOptinSmem; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = emu::kDefaultSmem; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = 132; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int value) {
  if (value < 0 || value > emu::kOptinSmem) return cudaErrorInvalidValue;
  emu::smem_attr()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n ? n : 1);  // exact size, so that AddressSanitizer sees overruns
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <class T>
cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* d, int v, size_t n) { std::memset(d, v, n); return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { cudaError_t e = emu::last_error(); emu::last_error() = cudaSuccess; return e; }
inline cudaError_t cudaPeekAtLastError() { return emu::last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "error (emulated)";
  }
}
inline float __fmul_rn(float a, float b) { return a * b; }
