// Woodbury launchers: argument checks and the choice between the shared-memory kernel
// (block resident on chip while it fits with this k's chunk width: c <= 207 for k >= 29 on
// sm_90, larger for smaller k) and the tiled kernel (block in global memory / L2, any c up
// to woodbury_max_block_size(), 1448 on sm_90). One launch per call.
#include <cstdlib>
#include <cstring>

#include "wf_compat.cuh"
#include "woodbury_internal.h"

namespace woodfisher {

namespace detail {

bool block_chol_requested() {
  const char* v = std::getenv("WOODFISHER_CUDA_CHOL");
  return v != nullptr && std::strcmp(v, "block") == 0;
}

}  // namespace detail

namespace {

constexpr int64_t kIntMax = 0x7fffffff;

cudaError_t run_woodbury(detail::WoodburyArgs a, int64_t block_size, int64_t num_grads,
                         WoodburyPath path, cudaStream_t stream) {
  if (a.num_blocks < 0 || block_size < 0 || num_grads < 0 || block_size > kIntMax ||
      num_grads > kIntMax || !(a.num_samples > 0.0f) || !std::isfinite(a.num_samples) ||
      !std::isfinite(a.init_diag)) {
    return cudaErrorInvalidValue;
  }
  if (a.num_blocks == 0 || block_size == 0) return cudaSuccess;
  if (a.inv == nullptr || (num_grads > 0 && a.grads == nullptr)) return cudaErrorInvalidValue;
  a.block_size = static_cast<int>(block_size);
  a.num_grads = static_cast<int>(num_grads);
  a.block_chol = detail::block_chol_requested();
  int limit = 0;
  cudaError_t err = detail::smem_optin_bytes(&limit);
  if (err != cudaSuccess) return err;
  bool shared = path == WoodburyPath::kShared;
  if (shared && a.block_size > detail::woodbury_shared_max_c(limit, detail::kMaxChunk)) {
    return cudaErrorInvalidValue;  // an explicit request holds for every k
  }
  if (path == WoodburyPath::kAuto) {
    shared = detail::auto_path(a.block_size, a.num_grads, limit) == WoodburyPath::kShared;
  }
  return shared ? detail::launch_woodbury_shared(a, limit, stream)
                : detail::launch_woodbury_tiled(a, limit, stream);
}

}  // namespace

int woodbury_shared_max_block_size() {
  int limit = 0;
  if (detail::smem_optin_bytes(&limit) != cudaSuccess) return 0;
  return detail::woodbury_shared_max_c(limit, detail::kMaxChunk);
}

int woodbury_max_block_size() {
  int limit = 0;
  if (detail::smem_optin_bytes(&limit) != cudaSuccess) return 0;
  return detail::woodbury_tiled_max_c(limit, detail::kMaxChunk);
}

int max_block_size() {
  int limit = 0;
  if (detail::smem_optin_bytes(&limit) != cudaSuccess) return 0;
  // obs_update keeps h and v (2c floats) in shared memory.
  const int64_t c = static_cast<int64_t>(limit) / static_cast<int64_t>(2 * sizeof(float));
  return static_cast<int>(c < kIntMax ? c : kIntMax);
}

cudaError_t woodbury_update(float* inv, const float* grads, int64_t num_blocks,
                            int64_t block_size, int64_t num_grads, float num_samples,
                            cudaStream_t stream, WoodburyPath path) {
  detail::WoodburyArgs a{inv, grads, num_blocks, 0, 0, num_samples, 0.0f, false};
  return run_woodbury(a, block_size, num_grads, path, stream);
}

cudaError_t fisher_inverse(float* out, const float* grads, int64_t num_blocks,
                           int64_t block_size, int64_t num_grads, float damp,
                           float num_samples, cudaStream_t stream, WoodburyPath path) {
  if (!(damp > 0.0f) || !std::isfinite(damp)) return cudaErrorInvalidValue;
  detail::WoodburyArgs a{out, grads, num_blocks, 0, 0, num_samples, 1.0f / damp, true};
  return run_woodbury(a, block_size, num_grads, path, stream);
}

}  // namespace woodfisher
