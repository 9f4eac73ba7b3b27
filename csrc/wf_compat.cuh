// Portability layer: the kernels and launchers compile either with nvcc (real CUDA)
// or, with -DWF_EMULATE, as plain C++ against the CPU SIMT emulator in emu/cuda_emu.h
// (used to execute the kernels' index logic and barriers on a machine without a GPU).
#pragma once

#ifdef WF_EMULATE
#include "emu/cuda_emu.h"
// Dynamic shared memory of the running CTA.
#define WF_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())
// kernel<<<grid, block, smem, stream>>>(args...)
#define WF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch((kernel), (grid), (block), (smem), (stream), __VA_ARGS__)
#define WF_FMUL_RN(a, b) ((a) * (b))
#else
#include <cuda_runtime.h>
#define WF_DYNAMIC_SMEM(T, name)                          \
  extern __shared__ __align__(16) unsigned char wf_smem_raw[]; \
  T* name = reinterpret_cast<T*>(wf_smem_raw)
#define WF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
// Rounded product that the compiler may not contract into an FMA (keeps updates symmetric).
#define WF_FMUL_RN(a, b) __fmul_rn((a), (b))
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace woodfisher {
namespace detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the 32 lanes of a warp; every lane returns the same bits (xor butterfly:
// lane l and l^o add the same two numbers at every step). All 32 lanes must call it.
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// Dot product of a row with a vector (both length n), split over the lanes of a warp.
// Every lane returns the same total. All 32 lanes must call it.
__device__ __forceinline__ float warp_dot(const float* a, const float* x, int n, int lane) {
  float acc = 0.0f;
  for (int j = lane; j < n; j += kWarp) acc = fmaf(a[j], x[j], acc);
  return warp_sum(acc);
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// True when p may be accessed with 16-byte vector loads.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Grid size for a CTA-per-block loop over `count` items (grid-stride beyond 2^31 - 1).
inline unsigned grid_for(int64_t count) {
  const int64_t cap = 0x7fffffff;
  return static_cast<unsigned>(count < cap ? count : cap);
}

constexpr int kDefaultSmemBytes = 48 * 1024;

// Dynamic shared memory one CTA may use on the current device after opting in.
inline cudaError_t smem_optin_bytes(int* bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

// Allow `kernel` to be launched with `bytes` of dynamic shared memory. The attribute is
// set to the device maximum (not to `bytes`) so that concurrent callers never lower it
// under each other's feet.
template <class Kernel>
cudaError_t allow_dynamic_smem(Kernel* kernel, size_t bytes) {
  if (bytes <= static_cast<size_t>(kDefaultSmemBytes)) return cudaSuccess;
  int limit = 0;
  cudaError_t err = smem_optin_bytes(&limit);
  if (err != cudaSuccess) return err;
  if (bytes > static_cast<size_t>(limit)) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
}

}  // namespace detail
}  // namespace woodfisher
