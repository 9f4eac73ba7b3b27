// Internal interface between the Woodbury launchers (woodbury.cu) and the two kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "woodfisher_kernels.h"

namespace woodfisher {
namespace detail {

struct WoodburyArgs {
  float* inv;          // (B, c, c), read (unless init) and written
  const float* grads;  // (B, k, c)
  int64_t num_blocks;  // B >= 1
  int block_size;      // c >= 1
  int num_grads;       // k >= 0
  float num_samples;   // N > 0
  float init_diag;     // 1 / damp when init
  bool init;           // start from init_diag * I instead of reading inv
};

// Shared-memory kernel: (c*c + 3c) floats per CTA.
size_t woodbury_shared_smem_bytes(int block_size);
int woodbury_shared_max_c(int smem_limit);
cudaError_t launch_woodbury_shared(const WoodburyArgs& a, int smem_limit, cudaStream_t stream);

// Tiled rank-K kernel: chunk of K <= 16 gradients, (2 K c + 256) floats per CTA.
// Returns the chunk size for block size c, or 0 if even K = 1 does not fit.
int woodbury_tiled_chunk(int block_size, int num_grads, int smem_limit);
cudaError_t launch_woodbury_tiled(const WoodburyArgs& a, int smem_limit, cudaStream_t stream);

}  // namespace detail
}  // namespace woodfisher
