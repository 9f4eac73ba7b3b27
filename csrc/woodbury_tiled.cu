// Tiled blocked rank-K Sherman-Morrison for blocks too large for shared memory.
//
// One CTA (256 threads) per block, grid-stride over blocks; the c x c block stays in
// global memory (L2) and is streamed twice per chunk of K <= 16 gradients G (K x c):
//   1. Gs <- G (shared)
//   2. U^T = G F        thread r: U^T[i][r] = sum_j F[j][r] G[i][j]  (F symmetric; the
//                       loads F[j][r] are coalesced across threads r); one pass over F
//   3. S = N I + G U    K(K+1)/2 dot products of length c, one warp each
//   4. S = L L^T        Cholesky by warp 0 (lane = row, K <= 16)
//   5. V^T = L^-1 U^T   forward substitution, thread r owns column r
//   6. F -= V V^T       warp per row, lanes along the row; second pass over F
// This equals K successive rank-one updates u = F g, F -= u u^T / (N + g.u) in exact
// arithmetic (F - U S^-1 U^T is their product), the same form as reference.py.
// Shared memory (floats): Gs[K][c] | V[K][c] | S[16][16].
#include "wf_compat.cuh"
#include "woodbury_internal.h"

namespace woodfisher {
namespace detail {
namespace {

constexpr int kTiledThreads = 256;
constexpr int kMaxChunk = 16;

template <bool kInit>
__global__ void __launch_bounds__(kTiledThreads)
woodbury_tiled_kernel(float* inv, const float* __restrict__ grads, int64_t num_blocks, int c,
                      int k, int chunk, float num_samples, float init_diag) {
  WF_DYNAMIC_SMEM(float, smem);
  float* Gs = smem;         // chunk * c
  float* V = Gs + chunk * c;  // chunk * c: U^T, then V^T
  float* S = V + chunk * c;   // kMaxChunk * kMaxChunk: S, then its Cholesky factor L
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  const int lane = tid % kWarp, warp = tid / kWarp, nwarps = nthreads / kWarp;
  const int64_t cc = static_cast<int64_t>(c) * c;

  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    float* F = inv + b * cc;  // not __restrict__: read after other threads wrote it
    const float* G = grads + b * static_cast<int64_t>(k) * c;
    if (kInit) {
      for (int64_t e = tid; e < cc; e += nthreads) F[e] = e % (c + 1) == 0 ? init_diag : 0.0f;
      __syncthreads();
    }
    for (int start = 0; start < k; start += chunk) {
      const int kc = k - start < chunk ? k - start : chunk;
      const float* src = G + static_cast<int64_t>(start) * c;
      for (int e = tid; e < kc * c; e += nthreads) Gs[e] = src[e];
      __syncthreads();

      for (int r = tid; r < c; r += nthreads) {  // 2. U^T = G F
        float acc[kMaxChunk];
#pragma unroll
        for (int i = 0; i < kMaxChunk; ++i) acc[i] = 0.0f;
        for (int j = 0; j < c; ++j) {
          const float f = F[static_cast<int64_t>(j) * c + r];
#pragma unroll
          for (int i = 0; i < kMaxChunk; ++i) {
            if (i < kc) acc[i] = fmaf(f, Gs[i * c + j], acc[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < kMaxChunk; ++i) {
          if (i < kc) V[i * c + r] = acc[i];
        }
      }
      __syncthreads();

      const int pairs = kc * (kc + 1) / 2;  // 3. lower triangle of S = N I + G U
      for (int p = warp; p < pairs; p += nwarps) {
        int i = 0, l = p;  // p enumerates (0,0), (1,0), (1,1), (2,0), ...
        while (l > i) {
          l -= i + 1;
          ++i;
        }
        const float dot = warp_dot(Gs + i * c, V + l * c, c, lane);
        if (lane == 0) S[i * kMaxChunk + l] = i == l ? dot + num_samples : dot;
      }
      __syncthreads();

      if (warp == 0) {  // 4. in-place Cholesky, column by column
        for (int j = 0; j < kc; ++j) {
          if (lane == j) {
            float s = S[j * kMaxChunk + j];
            for (int l = 0; l < j; ++l) s -= S[j * kMaxChunk + l] * S[j * kMaxChunk + l];
            S[j * kMaxChunk + j] = sqrtf(s);
          }
          __syncwarp();
          if (lane > j && lane < kc) {
            float s = S[lane * kMaxChunk + j];
            for (int l = 0; l < j; ++l) s -= S[lane * kMaxChunk + l] * S[j * kMaxChunk + l];
            S[lane * kMaxChunk + j] = s / S[j * kMaxChunk + j];
          }
          __syncwarp();
        }
      }
      __syncthreads();

      for (int r = tid; r < c; r += nthreads) {  // 5. V^T = L^-1 U^T, column r
        for (int i = 0; i < kc; ++i) {
          float s = V[i * c + r];
          for (int l = 0; l < i; ++l) s -= S[i * kMaxChunk + l] * V[l * c + r];
          V[i * c + r] = s / S[i * kMaxChunk + i];
        }
      }
      __syncthreads();

      for (int r = warp; r < c; r += nwarps) {  // 6. F -= V V^T
        float vr[kMaxChunk];
#pragma unroll
        for (int i = 0; i < kMaxChunk; ++i) vr[i] = i < kc ? V[i * c + r] : 0.0f;
        float* row = F + static_cast<int64_t>(r) * c;
        for (int j = lane; j < c; j += kWarp) {
          float acc = 0.0f;  // same products in the same order for (r, j) and (j, r)
#pragma unroll
          for (int i = 0; i < kMaxChunk; ++i) {
            if (i < kc) acc = fmaf(vr[i], V[i * c + j], acc);
          }
          row[j] -= acc;
        }
      }
      __syncthreads();  // F, Gs and V are reused by the next chunk
    }
  }
}

size_t tiled_smem_bytes(int block_size, int chunk) {
  return (2 * static_cast<size_t>(chunk) * block_size + kMaxChunk * kMaxChunk) * sizeof(float);
}

}  // namespace

int woodbury_tiled_chunk(int block_size, int num_grads, int smem_limit) {
  int chunk = num_grads < kMaxChunk ? num_grads : kMaxChunk;
  chunk = chunk < 1 ? 1 : chunk;
  while (chunk > 0 && tiled_smem_bytes(block_size, chunk) > static_cast<size_t>(smem_limit)) --chunk;
  return chunk;
}

cudaError_t launch_woodbury_tiled(const WoodburyArgs& a, int smem_limit, cudaStream_t stream) {
  const int chunk = woodbury_tiled_chunk(a.block_size, a.num_grads, smem_limit);
  if (a.block_size < 1 || chunk < 1) return cudaErrorInvalidValue;
  const size_t bytes = tiled_smem_bytes(a.block_size, chunk);
  auto kernel = a.init ? woodbury_tiled_kernel<true> : woodbury_tiled_kernel<false>;
  cudaError_t err = allow_dynamic_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  WF_LAUNCH(kernel, dim3(grid_for(a.num_blocks)), dim3(kTiledThreads), bytes, stream, a.inv,
            a.grads, a.num_blocks, a.block_size, a.num_grads, chunk, a.num_samples,
            a.init_diag);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace woodfisher
