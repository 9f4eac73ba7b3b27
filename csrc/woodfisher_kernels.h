// woodfisher_kernels: plain CUDA C++ launchers (no torch headers).
//
// All tensors are contiguous float32 in device memory, row-major:
//   inv      (B, c, c)   blockwise inverse Fisher, symmetric positive definite
//   grads    (B, k, c)   k gradient slices per block
//   weights  (B, c), loss_grad (B, c) or nullptr, prune_mask (B, c) bytes (nonzero = prune)
// Every launcher enqueues its work on `stream`, returns the launch status
// (cudaSuccess, or cudaErrorInvalidValue for unsupported sizes) and never synchronises.
// The maths is the one of woodfisher_kernels/reference.py (see docs in each .cu file).
#pragma once

#include <cstdint>

#ifdef WF_EMULATE
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace woodfisher {

// Which Woodbury kernel runs: the block kept in shared memory (c small enough), the
// tiled kernel that streams the block from global memory / L2, or automatic (shared
// whenever the block fits with this call's chunk width). Both apply the k gradients in
// register-blocked rank-K chunks of up to 32 gradients.
enum class WoodburyPath : int { kAuto = 0, kShared = 1, kTiled = 2 };

// Largest block size c that the shared-memory kernel accepts for any k on the current
// device (block + chunk buffers in dynamic shared memory; 207 on sm_90). Returns 0 on error.
int woodbury_shared_max_block_size();

// Largest block size c of woodbury_update / fisher_inverse on the current device (the
// tiled kernel keeps U^T, 32 x c floats, in shared memory; 1448 on sm_90). 0 on error.
int woodbury_max_block_size();

// Largest block size c of obs_saliency / obs_update on the current device (obs_update
// keeps 2c floats in shared memory). Returns 0 on error.
int max_block_size();

// inv[b] <- (inv[b]^-1 + grads[b]^T grads[b] / num_samples)^-1 by k successive rank-one
// Sherman-Morrison updates u = F g, F -= u u^T / (num_samples + g.u); in place, one launch.
cudaError_t woodbury_update(float* inv, const float* grads, int64_t num_blocks,
                            int64_t block_size, int64_t num_grads, float num_samples,
                            cudaStream_t stream, WoodburyPath path = WoodburyPath::kAuto);

// out[b] = (damp I + grads[b]^T grads[b] / num_samples)^-1, starting from I/damp without
// reading memory; out is (B, c, c) and fully written.
cudaError_t fisher_inverse(float* out, const float* grads, int64_t num_blocks,
                           int64_t block_size, int64_t num_grads, float damp,
                           float num_samples, cudaStream_t stream,
                           WoodburyPath path = WoodburyPath::kAuto);

// rho[b, q] = (w - h)_q^2 / (2 inv[b, q, q]), h = inv[b] @ loss_grad[b] (h = 0 if nullptr).
cudaError_t obs_saliency(float* rho, const float* inv, const float* weights,
                         const float* loss_grad, int64_t num_blocks, int64_t block_size,
                         cudaStream_t stream);

// out[b] = w - inv[b] v (- h), v_q = (w_q - h_q) / inv[b, q, q] where prune_mask, else 0;
// out is exactly 0 where prune_mask. h = inv[b] @ loss_grad[b] (h = 0 if nullptr).
cudaError_t obs_update(float* out, const float* inv, const float* weights,
                       const uint8_t* prune_mask, const float* loss_grad,
                       int64_t num_blocks, int64_t block_size, cudaStream_t stream);

}  // namespace woodfisher
