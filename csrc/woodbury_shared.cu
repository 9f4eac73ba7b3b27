// Fused blockwise Sherman-Morrison with the block resident in shared memory.
//
// One CTA per block (grid-stride over blocks), blockDim = clamp(round_up(c, 32), 32, 256).
// Shared memory (floats): F[c*c] | g[2][c] (double-buffered gradient) | u[c].
// F is read from global memory once (or set to I/damp without reading), then for each of
// the k gradients g (in order):
//   phase 1  u = F g            thread r computes u[r] = sum_j F[j][r] g[j]
//                               (F symmetric; column reads are bank-conflict free),
//                               and the next gradient is prefetched into the other buffer
//   -- __syncthreads --
//   phase 2  s = 1/sqrt(N + g.u)   every warp reduces g.u itself (same bits in all warps)
//            F -= (s u)(s u)^T     warp per row, lanes along the row; the product of two
//                                  rounded factors keeps F exactly symmetric
//   -- __syncthreads --
// and F is written back once. Two barriers per gradient.
#include "wf_compat.cuh"
#include "woodbury_internal.h"

namespace woodfisher {
namespace detail {
namespace {

constexpr int kSharedMaxThreads = 256;

template <bool kInit>
__global__ void __launch_bounds__(kSharedMaxThreads)
woodbury_shared_kernel(float* __restrict__ inv, const float* __restrict__ grads,
                       int64_t num_blocks, int c, int k, float num_samples, float init_diag) {
  WF_DYNAMIC_SMEM(float, smem);
  const int cc = c * c;
  float* F = smem;          // c * c
  float* gbuf = F + cc;     // 2 * c
  float* u = gbuf + 2 * c;  // c
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  const int lane = tid % kWarp, warp = tid / kWarp, nwarps = nthreads / kWarp;

  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    float* Fglob = inv + b * cc;
    const float* G = grads + b * static_cast<int64_t>(k) * c;
    for (int e = tid; e < cc; e += nthreads) {
      F[e] = kInit ? (e % (c + 1) == 0 ? init_diag : 0.0f) : Fglob[e];
    }
    if (k > 0) {
      for (int t = tid; t < c; t += nthreads) gbuf[t] = G[t];
    }
    __syncthreads();

    for (int i = 0; i < k; ++i) {
      const float* g = gbuf + (i & 1) * c;
      if (i + 1 < k) {  // buffer (i+1)&1 was last read in step i-1, before its final barrier
        float* next = gbuf + ((i + 1) & 1) * c;
        const float* src = G + static_cast<int64_t>(i + 1) * c;
        for (int t = tid; t < c; t += nthreads) next[t] = src[t];
      }
      for (int r = tid; r < c; r += nthreads) {
        float acc = 0.0f;
        for (int j = 0; j < c; ++j) acc = fmaf(F[j * c + r], g[j], acc);
        u[r] = acc;
      }
      __syncthreads();

      const float s = 1.0f / sqrtf(num_samples + warp_dot(g, u, c, lane));
      for (int r = warp; r < c; r += nwarps) {
        const float a = WF_FMUL_RN(u[r], s);
        float* row = F + r * c;
        for (int j = lane; j < c; j += kWarp) row[j] = fmaf(-a, WF_FMUL_RN(u[j], s), row[j]);
      }
      __syncthreads();
    }

    for (int e = tid; e < cc; e += nthreads) Fglob[e] = F[e];
    __syncthreads();  // F is reloaded for the next block of this CTA
  }
}

}  // namespace

size_t woodbury_shared_smem_bytes(int block_size) {
  const size_t c = static_cast<size_t>(block_size);
  return (c * c + 3 * c) * sizeof(float);
}

int woodbury_shared_max_c(int smem_limit) {
  int c = 0;
  while (woodbury_shared_smem_bytes(c + 1) <= static_cast<size_t>(smem_limit)) ++c;
  return c;
}

cudaError_t launch_woodbury_shared(const WoodburyArgs& a, int smem_limit, cudaStream_t stream) {
  const size_t bytes = woodbury_shared_smem_bytes(a.block_size);
  if (a.block_size < 1 || bytes > static_cast<size_t>(smem_limit)) return cudaErrorInvalidValue;
  auto kernel = a.init ? woodbury_shared_kernel<true> : woodbury_shared_kernel<false>;
  cudaError_t err = allow_dynamic_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  int threads = round_up(a.block_size, kWarp);
  threads = threads < kSharedMaxThreads ? threads : kSharedMaxThreads;
  WF_LAUNCH(kernel, dim3(grid_for(a.num_blocks)), dim3(threads), bytes, stream, a.inv, a.grads,
            a.num_blocks, a.block_size, a.num_grads, a.num_samples, a.init_diag);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace woodfisher
