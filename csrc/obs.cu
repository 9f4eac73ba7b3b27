// OBS statistic and update for all blocks, fused with the diagonal extraction.
//
// obs_saliency, plain:      one thread per weight, rho = w^2 / (2 F_qq)      (1 launch)
// obs_saliency, WoodTaylor: one warp per row (b, q) over all B*c rows:
//                           h_q = F[q,:] . loss_grad (lanes along the row, coalesced),
//                           rho = (w_q - h_q)^2 / (2 F_qq)                    (1 launch)
// obs_update:               one CTA (256 threads) per block, grid-stride over blocks,
//                           shared memory h[c] | v[c]:
//                           h = F loss_grad (warp per row)             -- barrier --
//                           v_q = (w_q - h_q) / F_qq on the mask, else 0  -- barrier --
//                           out_q = (w_q - F[q,:] . v) - h_q, 0 on the mask  (1 launch)
// Same operation order as woodfisher_kernels/reference.py.
#include "wf_compat.cuh"
#include "woodfisher_kernels.h"

namespace woodfisher {
namespace detail {
namespace {

constexpr int kObsThreads = 256;
constexpr int kObsWarps = kObsThreads / kWarp;

__global__ void __launch_bounds__(kObsThreads)
saliency_plain_kernel(float* __restrict__ rho, const float* __restrict__ inv,
                      const float* __restrict__ weights, int64_t total, int c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t q = idx % c;
    const float w = weights[idx];
    rho[idx] = (w * w) / (2.0f * inv[idx * c + q]);  // inv[b][q][q], idx = b*c + q
  }
}

__global__ void __launch_bounds__(kObsThreads)
saliency_woodtaylor_kernel(float* __restrict__ rho, const float* __restrict__ inv,
                           const float* __restrict__ weights, const float* __restrict__ loss_grad,
                           int64_t total_rows, int c) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kObsWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kObsWarps + threadIdx.x / kWarp;
       row < total_rows; row += stride) {  // row = b*c + q, uniform across the warp
    const int64_t b = row / c;
    const int64_t q = row - b * c;
    const float* f = inv + row * c;  // inv[b][q][:]
    const float h = warp_dot(f, loss_grad + b * c, c, lane);
    if (lane == 0) {
      const float resid = weights[row] - h;
      rho[row] = (resid * resid) / (2.0f * f[q]);
    }
  }
}

__global__ void __launch_bounds__(kObsThreads)
obs_update_kernel(float* __restrict__ out, const float* __restrict__ inv,
                  const float* __restrict__ weights, const uint8_t* __restrict__ mask,
                  const float* __restrict__ loss_grad, int64_t num_blocks, int c) {
  WF_DYNAMIC_SMEM(float, smem);
  float* h = smem;     // c, only with loss_grad
  float* v = smem + c;  // c
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarp, warp = tid / kWarp;
  const bool taylor = loss_grad != nullptr;
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const float* F = inv + b * c * c;
    const float* w = weights + b * c;
    const uint8_t* m = mask + b * c;
    if (taylor) {
      const float* x = loss_grad + b * c;
      for (int q = warp; q < c; q += kObsWarps) {
        const float hq = warp_dot(F + static_cast<int64_t>(q) * c, x, c, lane);
        if (lane == 0) h[q] = hq;
      }
    }
    __syncthreads();
    for (int q = tid; q < c; q += kObsThreads) {
      const float resid = taylor ? w[q] - h[q] : w[q];
      v[q] = m[q] ? resid / F[static_cast<int64_t>(q) * (c + 1)] : 0.0f;
    }
    __syncthreads();
    for (int q = warp; q < c; q += kObsWarps) {
      const float fv = warp_dot(F + static_cast<int64_t>(q) * c, v, c, lane);
      if (lane == 0) {
        float nq = w[q] - fv;
        if (taylor) nq -= h[q];
        out[b * c + q] = m[q] ? 0.0f : nq;
      }
    }
    __syncthreads();  // h and v are rewritten for the next block of this CTA
  }
}

}  // namespace
}  // namespace detail

namespace {

bool bad_sizes(int64_t num_blocks, int64_t block_size) {
  return num_blocks < 0 || block_size < 0 || block_size > max_block_size();
}

}  // namespace

cudaError_t obs_saliency(float* rho, const float* inv, const float* weights,
                         const float* loss_grad, int64_t num_blocks, int64_t block_size,
                         cudaStream_t stream) {
  using namespace detail;
  if (bad_sizes(num_blocks, block_size)) return cudaErrorInvalidValue;
  if (num_blocks == 0 || block_size == 0) return cudaSuccess;
  const int c = static_cast<int>(block_size);
  const int64_t total = num_blocks * block_size;
  if (loss_grad == nullptr) {
    const int64_t ctas = (total + kObsThreads - 1) / kObsThreads;
    WF_LAUNCH(saliency_plain_kernel, dim3(grid_for(ctas)), dim3(kObsThreads), 0, stream, rho,
              inv, weights, total, c);
  } else {
    const int64_t ctas = (total + kObsWarps - 1) / kObsWarps;
    WF_LAUNCH(saliency_woodtaylor_kernel, dim3(grid_for(ctas)), dim3(kObsThreads), 0, stream,
              rho, inv, weights, loss_grad, total, c);
  }
  return cudaGetLastError();
}

cudaError_t obs_update(float* out, const float* inv, const float* weights,
                       const uint8_t* prune_mask, const float* loss_grad, int64_t num_blocks,
                       int64_t block_size, cudaStream_t stream) {
  using namespace detail;
  if (bad_sizes(num_blocks, block_size)) return cudaErrorInvalidValue;
  if (num_blocks == 0 || block_size == 0) return cudaSuccess;
  const size_t bytes = 2 * static_cast<size_t>(block_size) * sizeof(float);
  cudaError_t err = allow_dynamic_smem(obs_update_kernel, bytes);
  if (err != cudaSuccess) return err;
  WF_LAUNCH(obs_update_kernel, dim3(grid_for(num_blocks)), dim3(kObsThreads), bytes, stream, out,
            inv, weights, prune_mask, loss_grad, num_blocks, static_cast<int>(block_size));
  return cudaGetLastError();
}

}  // namespace woodfisher
