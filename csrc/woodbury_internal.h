// Internal interface between the Woodbury launchers (woodbury.cu) and the two kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "woodfisher_kernels.h"

namespace woodfisher {
namespace detail {

constexpr int kMaxChunk = 32;  // gradients per rank-K chunk

// Chunk width for k gradients: min(k, kMaxChunk) rounded up to a multiple of 4 (>= 4).
inline int chunk_width(int num_grads) {
  const int k = num_grads < 1 ? 1 : (num_grads < kMaxChunk ? num_grads : kMaxChunk);
  return (k + 3) / 4 * 4;
}

struct WoodburyArgs {
  float* inv;          // (B, c, c), read (unless init) and written
  const float* grads;  // (B, k, c)
  int64_t num_blocks;  // B >= 1
  int block_size;      // c >= 1
  int num_grads;       // k >= 0
  float num_samples;   // N > 0
  float init_diag;     // 1 / damp when init
  bool init;           // start from init_diag * I instead of reading inv
  bool block_chol = false;  // experimental: the K x K Cholesky on the whole CTA (chol_phase_block)
};

// WOODFISHER_CUDA_CHOL=block in the environment, read at every launch (benchmarks switch it).
bool block_chol_requested();

// Shared-memory kernel, chunks of `chunk` gradients (a multiple of 4, <= kMaxChunk).
size_t woodbury_shared_smem_bytes(int block_size, int chunk);
int woodbury_shared_max_c(int smem_limit, int chunk);
cudaError_t launch_woodbury_shared(const WoodburyArgs& a, int smem_limit, cudaStream_t stream);

// Tiled kernel (block in global memory): U^T (chunk x c) and fixed-size tiles in shared memory.
size_t woodbury_tiled_smem_bytes(int block_size, int chunk);
int woodbury_tiled_max_c(int smem_limit, int chunk);
cudaError_t launch_woodbury_tiled(const WoodburyArgs& a, int smem_limit, cudaStream_t stream);

// The kernel WoodburyPath::kAuto runs for (c, k): shared while the block fits with this k's chunk.
inline WoodburyPath auto_path(int block_size, int num_grads, int smem_limit) {
  return woodbury_shared_smem_bytes(block_size, chunk_width(num_grads)) <= static_cast<size_t>(smem_limit)
             ? WoodburyPath::kShared
             : WoodburyPath::kTiled;
}

}  // namespace detail
}  // namespace woodfisher
