// Torch op registration for the csrc/ launchers: the only file that includes torch.
//
// Ops (namespace woodfisher_kernels, CUDA float32 contiguous tensors, run on the current
// CUDA stream of the tensors' device):
//   woodbury_update_(Tensor(a!) inv, Tensor grads, float num_samples) -> ()
//   fisher_inverse(Tensor grads, float damp, float num_samples) -> Tensor
//   obs_saliency(Tensor inv, Tensor weights, Tensor? loss_grad) -> Tensor
//   obs_update(Tensor inv, Tensor weights, Tensor prune_mask, Tensor? loss_grad) -> Tensor
// plus, for tests and benchmarks, the same Woodbury ops with an explicit kernel choice
// (path 0 = auto, 1 = shared-memory, 2 = tiled) and _limits() -> [largest c of the
// shared-memory Woodbury kernel, of the Woodbury ops, of the OBS ops].
// Loaded from Python as the extension module woodfisher_kernels._C (no Python functions).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "woodfisher_kernels.h"

namespace {

using woodfisher::WoodburyPath;

// Error messages hold only strings: numbers, shapes, dtypes and devices are formatted here
// (std::to_string / snprintf / c10's own to-string functions), never by an ostream of this
// library. An extension linked with a second, static copy of libstdc++ (the g++ of some
// toolchains does this; seen on the H200 image) loses or crashes on ostream number formatting,
// which reads the locale facets of the other copy.
std::string num(int64_t v) { return std::to_string(v); }

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + num(sizes[i]);
  return out + ")";
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "woodfisher_kernels.", op, ": CUDA error: ",
              cudaGetErrorString(err));
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype,
                  const at::Tensor* like = nullptr) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device().str());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", c10::toString(dtype),
                    ", got ", c10::toString(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", num(dim), " dimensions, got shape ",
                    shape(t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  if (like != nullptr) {
    TORCH_CHECK_VALUE(t.device() == like->device(), name, " is on ", t.device().str(),
                      " but inv is on ", like->device().str());
  }
}

void check_block_size(int64_t c, int64_t limit) {
  TORCH_CHECK_VALUE(c <= limit, "block size ", num(c), " exceeds the CUDA backend's limit ",
                    num(limit),
                    " on this device; use backend='torch' or the low-rank form");
}

// Kernel choice; call after the device guard (limits depend on the device).
WoodburyPath to_path(int64_t path, int64_t c) {
  TORCH_CHECK_VALUE(path >= 0 && path <= 2, "path must be 0 (auto), 1 (shared) or 2 (tiled)");
  const auto p = static_cast<WoodburyPath>(path);
  if (p == WoodburyPath::kShared) {
    const int64_t limit = woodfisher::woodbury_shared_max_block_size();
    TORCH_CHECK_VALUE(c <= limit, "the shared-memory kernel holds blocks up to c=", num(limit),
                      ", got c=", num(c));
  }
  return p;
}

void woodbury_update_path_(const at::Tensor& inv, const at::Tensor& grads, double num_samples,
                           int64_t path) {
  check_tensor(inv, "inv", 3, at::kFloat);
  check_tensor(grads, "grads", 3, at::kFloat, &inv);
  const int64_t B = inv.size(0), c = inv.size(1), k = grads.size(1);
  TORCH_CHECK_VALUE(inv.size(2) == c, "inv must hold square blocks, got shape ",
                    shape(inv.sizes()));
  TORCH_CHECK_VALUE(grads.size(0) == B && grads.size(2) == c, "grads must have shape (", num(B),
                    ", k, ", num(c), "), got ", shape(grads.sizes()));
  TORCH_CHECK_VALUE(num_samples > 0, "num_samples must be > 0, got ", num(num_samples));
  const c10::cuda::CUDAGuard guard(inv.device());
  check_block_size(c, woodfisher::woodbury_max_block_size());
  const WoodburyPath kernel = to_path(path, c);
  check_cuda(woodfisher::woodbury_update(inv.data_ptr<float>(), grads.data_ptr<float>(), B, c, k,
                                         static_cast<float>(num_samples),
                                         c10::cuda::getCurrentCUDAStream().stream(), kernel),
             "woodbury_update_");
}

void woodbury_update_(const at::Tensor& inv, const at::Tensor& grads, double num_samples) {
  woodbury_update_path_(inv, grads, num_samples, 0);
}

at::Tensor fisher_inverse_path(const at::Tensor& grads, double damp, double num_samples,
                               int64_t path) {
  check_tensor(grads, "grads", 3, at::kFloat);
  TORCH_CHECK_VALUE(damp > 0, "damp must be > 0, got ", num(damp));
  TORCH_CHECK_VALUE(num_samples > 0, "num_samples must be > 0, got ", num(num_samples));
  const int64_t B = grads.size(0), k = grads.size(1), c = grads.size(2);
  const c10::cuda::CUDAGuard guard(grads.device());
  check_block_size(c, woodfisher::woodbury_max_block_size());
  const WoodburyPath kernel = to_path(path, c);
  at::Tensor out = at::empty({B, c, c}, grads.options());
  check_cuda(woodfisher::fisher_inverse(out.data_ptr<float>(), grads.data_ptr<float>(), B, c, k,
                                        static_cast<float>(damp),
                                        static_cast<float>(num_samples),
                                        c10::cuda::getCurrentCUDAStream().stream(), kernel),
             "fisher_inverse");
  return out;
}

at::Tensor fisher_inverse(const at::Tensor& grads, double damp, double num_samples) {
  return fisher_inverse_path(grads, damp, num_samples, 0);
}

// Shared checks of obs_saliency / obs_update; returns the loss gradient pointer or nullptr.
const float* check_obs(const at::Tensor& inv, const at::Tensor& weights,
                       const std::optional<at::Tensor>& loss_grad) {
  check_tensor(inv, "inv", 3, at::kFloat);
  check_tensor(weights, "weights", 2, at::kFloat, &inv);
  const int64_t B = inv.size(0), c = inv.size(1);
  TORCH_CHECK_VALUE(inv.size(2) == c, "inv must hold square blocks, got shape ",
                    shape(inv.sizes()));
  TORCH_CHECK_VALUE(weights.size(0) == B && weights.size(1) == c, "weights must have shape (",
                    num(B), ", ", num(c), "), got ", shape(weights.sizes()));
  if (!loss_grad.has_value()) return nullptr;
  check_tensor(*loss_grad, "loss_grad", 2, at::kFloat, &inv);
  TORCH_CHECK_VALUE(loss_grad->sizes() == weights.sizes(), "loss_grad must have shape ",
                    shape(weights.sizes()), ", got ", shape(loss_grad->sizes()));
  return loss_grad->data_ptr<float>();
}

at::Tensor obs_saliency(const at::Tensor& inv, const at::Tensor& weights,
                        const std::optional<at::Tensor>& loss_grad) {
  const float* x = check_obs(inv, weights, loss_grad);
  const c10::cuda::CUDAGuard guard(inv.device());
  check_block_size(inv.size(1), woodfisher::max_block_size());
  at::Tensor rho = at::empty_like(weights);
  check_cuda(woodfisher::obs_saliency(rho.data_ptr<float>(), inv.data_ptr<float>(),
                                      weights.data_ptr<float>(), x, inv.size(0), inv.size(1),
                                      c10::cuda::getCurrentCUDAStream().stream()),
             "obs_saliency");
  return rho;
}

at::Tensor obs_update(const at::Tensor& inv, const at::Tensor& weights,
                      const at::Tensor& prune_mask, const std::optional<at::Tensor>& loss_grad) {
  const float* x = check_obs(inv, weights, loss_grad);
  check_tensor(prune_mask, "prune_mask", 2, at::kBool, &inv);
  TORCH_CHECK_VALUE(prune_mask.sizes() == weights.sizes(), "prune_mask must have shape ",
                    shape(weights.sizes()), ", got ", shape(prune_mask.sizes()));
  const c10::cuda::CUDAGuard guard(inv.device());
  check_block_size(inv.size(1), woodfisher::max_block_size());
  at::Tensor out = at::empty_like(weights);
  static_assert(sizeof(bool) == sizeof(uint8_t), "bool masks are read as bytes");
  check_cuda(woodfisher::obs_update(out.data_ptr<float>(), inv.data_ptr<float>(),
                                    weights.data_ptr<float>(),
                                    reinterpret_cast<const uint8_t*>(prune_mask.data_ptr<bool>()),
                                    x, inv.size(0), inv.size(1),
                                    c10::cuda::getCurrentCUDAStream().stream()),
             "obs_update");
  return out;
}

std::vector<int64_t> limits() {
  return {woodfisher::woodbury_shared_max_block_size(), woodfisher::woodbury_max_block_size(),
          woodfisher::max_block_size()};
}

}  // namespace

TORCH_LIBRARY(woodfisher_kernels, m) {
  m.def("woodbury_update_(Tensor(a!) inv, Tensor grads, float num_samples) -> ()");
  m.def("fisher_inverse(Tensor grads, float damp, float num_samples) -> Tensor");
  m.def("obs_saliency(Tensor inv, Tensor weights, Tensor? loss_grad) -> Tensor");
  m.def("obs_update(Tensor inv, Tensor weights, Tensor prune_mask, Tensor? loss_grad) -> Tensor");
  m.def("_woodbury_update_path_(Tensor(a!) inv, Tensor grads, float num_samples, int path) -> ()");
  m.def("_fisher_inverse_path(Tensor grads, float damp, float num_samples, int path) -> Tensor");
  m.def("_limits() -> int[]", &limits);
}

TORCH_LIBRARY_IMPL(woodfisher_kernels, CUDA, m) {
  m.impl("woodbury_update_", &woodbury_update_);
  m.impl("fisher_inverse", &fisher_inverse);
  m.impl("obs_saliency", &obs_saliency);
  m.impl("obs_update", &obs_update);
  m.impl("_woodbury_update_path_", &woodbury_update_path_);
  m.impl("_fisher_inverse_path", &fisher_inverse_path);
}

// A Python extension module with no functions: importing it runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
