// Standalone check of the csrc/ launchers: random data, double-precision CPU references,
// max errors per case (max|x - ref| / max|ref|; exact symmetry: max|F - F^T|); exits 1 if
// any case fails, 0 (with a message) without a GPU.
//
//   woodfisher_driver           full size grid (c up to 600, B up to 1000)
//   woodfisher_driver --quick   small grid (used with the CPU emulator build)
//   woodfisher_driver [--quick] BxCxK ...   only the given cases
//   woodfisher_driver --resources CxK ...   JSON lines: kernel path, chunk width and dynamic
//                                           shared memory of the Woodbury launch for (c, k)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "woodbury_internal.h"
#include "woodfisher_kernels.h"

namespace {

using woodfisher::WoodburyPath;
using Vec = std::vector<float>;
using DVec = std::vector<double>;

int failures = 0;

#define CUDA_OK(expr)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (expr);                                                           \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

// Device copy of a host vector (or of n zero bytes), freed at scope exit.
template <class T>
struct Dev {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T) + 1));
    CUDA_OK(cudaMemset(ptr, 0, n * sizeof(T)));
  }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) {
    CUDA_OK(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~Dev() { cudaFree(ptr); }
  std::vector<T> host() const {
    std::vector<T> h(n);
    CUDA_OK(cudaDeviceSynchronize());
    CUDA_OK(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

Vec normal(size_t n, std::mt19937& g, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  Vec v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// Sequential Sherman-Morrison in double: F (B,c,c) updated by grads (B,k,c).
void ref_woodbury(DVec& F, const Vec& G, int64_t B, int c, int k, double N) {
  DVec u(c);
  for (int64_t b = 0; b < B; ++b) {
    double* f = &F[b * c * c];
    for (int i = 0; i < k; ++i) {
      const float* g = &G[(b * k + i) * c];
      double d = N;
      for (int r = 0; r < c; ++r) {
        double s = 0;
        for (int j = 0; j < c; ++j) s += f[r * c + j] * g[j];
        u[r] = s;
        d += g[r] * s;
      }
      for (int r = 0; r < c; ++r)
        for (int j = 0; j < c; ++j) f[r * c + j] -= u[r] * u[j] / d;
    }
  }
}

double max_rel_err(const Vec& got, const DVec& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::fmax(err, std::fabs(got[i] - want[i]));
    scale = std::fmax(scale, std::fabs(want[i]));
    if (std::isnan(got[i])) return INFINITY;
  }
  return err / (scale > 0 ? scale : 1.0);
}

void report(const char* what, int64_t B, int c, int k, double err, double tol) {
  const bool ok = err <= tol;
  failures += !ok;
  std::printf("%-22s B=%-5lld c=%-4d k=%-4d err %.3e (tol %.0e) %s\n", what,
              static_cast<long long>(B), c, k, err, tol, ok ? "ok" : "FAIL");
}

// The experimental block-wide Cholesky (WOODFISHER_CUDA_CHOL=block) must give the same bits as
// the default one-warp factorisation (NaN-poisoned blocks: NaN where it is NaN).
void check_block_chol(const Vec& want, const float* grads, int64_t B, int c, int k, float damp, float N,
                      WoodburyPath path, const char* name) {
  setenv("WOODFISHER_CUDA_CHOL", "block", 1);
  Dev<float> inv(static_cast<size_t>(B * c * c));
  CUDA_OK(woodfisher::fisher_inverse(inv.ptr, grads, B, c, k, damp, N, nullptr, path));
  unsetenv("WOODFISHER_CUDA_CHOL");
  const Vec got = inv.host();
  size_t differ = 0;  // entries with other bits; NaN payloads may differ (NaN-poisoned blocks)
  for (size_t e = 0; e < want.size(); ++e) {
    differ += !(std::isnan(want[e]) && std::isnan(got[e])) && std::memcmp(&want[e], &got[e], sizeof(float)) != 0;
  }
  report((std::string("block chol, same bits/") + name).c_str(), B, c, k, static_cast<double>(differ), 0.0);
}

void check_woodbury(int64_t B, int c, int k, WoodburyPath path, const char* name, std::mt19937& g) {
  const float damp = 0.5f, N = 1.5f * k;
  const Vec G1 = normal(B * k * c, g), G2 = normal(B * k * c, g);
  Dev<float> inv(static_cast<size_t>(B * c * c));
  Dev<float> d1(G1), d2(G2);
  CUDA_OK(woodfisher::fisher_inverse(inv.ptr, d1.ptr, B, c, k, damp, N, nullptr, path));
  const Vec built = inv.host();
  DVec want(B * c * c, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int r = 0; r < c; ++r) want[(b * c + r) * c + r] = 1.0 / damp;
  ref_woodbury(want, G1, B, c, k, N);
  report((std::string("fisher_inverse/") + name).c_str(), B, c, k, max_rel_err(built, want), 1e-4);
  double asym = 0;  // both kernels keep the blocks exactly symmetric
  for (int64_t b = 0; b < B; ++b)
    for (int r = 0; r < c; ++r)
      for (int j = 0; j < r; ++j)
        asym = std::fmax(asym, std::fabs(built[(b * c + r) * c + j] - built[(b * c + j) * c + r]));
  report((std::string("exact symmetry/") + name).c_str(), B, c, k, asym, 0.0);

  check_block_chol(built, d1.ptr, B, c, k, damp, N, path, name);

  DVec want2(built.begin(), built.end());  // update continues from the float result
  CUDA_OK(woodfisher::woodbury_update(inv.ptr, d2.ptr, B, c, k, N, nullptr, path));
  ref_woodbury(want2, G2, B, c, k, N);
  report((std::string("woodbury_update/") + name).c_str(), B, c, k, max_rel_err(inv.host(), want2), 1e-4);
}

// lambda_max(G^T G / N) of one block by power iteration (double).
double lambda_max(const float* G, int c, int k, double N) {
  DVec x(c, 1.0), y(c), t(k);
  double lam = 0;
  for (int it = 0; it < 200; ++it) {
    for (int i = 0; i < k; ++i) {
      t[i] = 0;
      for (int j = 0; j < c; ++j) t[i] += G[i * c + j] * x[j];
    }
    double norm = 0;
    for (int j = 0; j < c; ++j) {
      y[j] = 0;
      for (int i = 0; i < k; ++i) y[j] += G[i * c + j] * t[i];
      norm += y[j] * y[j];
    }
    norm = std::sqrt(norm);
    lam = norm / N;
    for (int j = 0; j < c; ++j) x[j] = y[j] / norm;
  }
  return lam;
}

// Ill-conditioned build, kappa = lambda_max(G^T G / N) / damp up to ~1e9. Every block must
// be accurate as float32 allows (max error <= eps32 kappa, relative to max |entry|) or
// entirely NaN (the K x K factorisation found F no longer positive definite): never finite
// garbage.
void check_ill_conditioned(int64_t B, int c, int k, float damp, WoodburyPath path, const char* name,
                           std::mt19937& g) {
  const Vec G = normal(B * k * c, g);
  Dev<float> inv(static_cast<size_t>(B * c * c));
  Dev<float> d1(G);
  CUDA_OK(woodfisher::fisher_inverse(inv.ptr, d1.ptr, B, c, k, damp, float(k), nullptr, path));
  const Vec got = inv.host();
  check_block_chol(got, d1.ptr, B, c, k, damp, float(k), path, name);
  DVec want(B * c * c, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int r = 0; r < c; ++r) want[(b * c + r) * c + r] = 1.0 / damp;
  ref_woodbury(want, G, B, c, k, k);
  double worst = 0, kappa = 0;  // error in units of eps32 kappa; 0 for an all-NaN block
  int poisoned = 0;
  for (int64_t b = 0; b < B; ++b) {
    const size_t off = static_cast<size_t>(b) * c * c, n = static_cast<size_t>(c) * c;
    size_t nans = 0;
    for (size_t e = 0; e < n; ++e) nans += std::isnan(got[off + e]);
    kappa = lambda_max(&G[b * k * c], c, k, k) / damp;
    if (nans == n) {
      ++poisoned;
      continue;
    }
    const Vec blk(got.begin() + off, got.begin() + off + n);
    const DVec ref(want.begin() + off, want.begin() + off + n);
    worst = std::fmax(worst, max_rel_err(blk, ref) / (1.1920929e-7 * kappa));
  }
  std::printf("  (damp %.0e, kappa ~%.1e: %d of %lld block(s) NaN-poisoned)\n", damp, kappa, poisoned,
              static_cast<long long>(B));
  report((std::string("ill-conditioned/") + name).c_str(), B, c, k, worst, 1.0);
}

// OBS statistic and update on the inverse built from k gradients, plain and WoodTaylor.
void check_obs(int64_t B, int c, int k, std::mt19937& g) {
  const float damp = 0.5f;
  const Vec G = normal(B * k * c, g), w = normal(B * c, g), x = normal(B * c, g, 0.1f);
  std::vector<uint8_t> mask(B * c);
  for (auto& m : mask) m = (g() % 3) == 0;
  Dev<float> inv(static_cast<size_t>(B * c * c)), dG(G), dw(w), dx(x);
  Dev<uint8_t> dm(mask);
  CUDA_OK(woodfisher::fisher_inverse(inv.ptr, dG.ptr, B, c, k, damp, float(k), nullptr));
  const Vec F = inv.host();
  Dev<float> out(static_cast<size_t>(B * c));
  for (int taylor = 0; taylor < 2; ++taylor) {
    DVec h(B * c, 0.0), rho(B * c), v(B * c), upd(B * c);
    for (int64_t b = 0; b < B; ++b) {
      const float* f = &F[b * c * c];
      for (int q = 0; q < c; ++q) {
        for (int j = 0; taylor && j < c; ++j) h[b * c + q] += double(f[q * c + j]) * x[b * c + j];
        const double resid = w[b * c + q] - h[b * c + q], diag = f[q * c + q];
        rho[b * c + q] = resid * resid / (2 * diag);
        v[b * c + q] = mask[b * c + q] ? resid / diag : 0.0;
      }
      for (int q = 0; q < c; ++q) {
        double fv = 0;
        for (int j = 0; j < c; ++j) fv += double(f[q * c + j]) * v[b * c + j];
        upd[b * c + q] = mask[b * c + q] ? 0.0 : w[b * c + q] - fv - h[b * c + q];
      }
    }
    const float* xp = taylor ? dx.ptr : nullptr;
    CUDA_OK(woodfisher::obs_saliency(out.ptr, inv.ptr, dw.ptr, xp, B, c, nullptr));
    report(taylor ? "obs_saliency/taylor" : "obs_saliency/plain", B, c, k, max_rel_err(out.host(), rho), 1e-5);
    CUDA_OK(woodfisher::obs_update(out.ptr, inv.ptr, dw.ptr, dm.ptr, xp, B, c, nullptr));
    const Vec got = out.host();
    double exact_zero = 0;
    for (int64_t i = 0; i < B * c; ++i)
      if (mask[i] && (got[i] != 0.0f || std::signbit(got[i]))) exact_zero = INFINITY;
    report(taylor ? "obs_update/taylor" : "obs_update/plain", B, c, k,
           std::fmax(max_rel_err(got, upd), exact_zero), 1e-4);
  }
}

// --resources CxK ...: what a Woodbury launch uses on the current device (no kernel runs).
int print_resources(int argc, char** argv) {
  int limit = 0;
  CUDA_OK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  for (int a = 2; a < argc; ++a) {
    int c = 0, k = 0;
    if (std::sscanf(argv[a], "%dx%d", &c, &k) != 2 || c < 1 || k < 0) {
      std::fprintf(stderr, "bad case '%s' (expected CxK)\n", argv[a]);
      return 2;
    }
    namespace d = woodfisher::detail;
    const int kk = d::chunk_width(k);
    const bool shared = d::auto_path(c, k, limit) == WoodburyPath::kShared;
    const bool fits = shared || c <= woodfisher::woodbury_max_block_size();
    std::printf("{\"c\": %d, \"k\": %d, \"chunk\": %d, \"path\": \"%s\", \"smem\": %zu, \"shared_smem\": %zu, "
                "\"tiled_smem\": %zu}\n", c, k, kk, fits ? (shared ? "shared" : "tiled") : "none",
                shared ? d::woodbury_shared_smem_bytes(c, kk) : d::woodbury_tiled_smem_bytes(c, kk),
                d::woodbury_shared_smem_bytes(c, kk), d::woodbury_tiled_smem_bytes(c, kk));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("woodfisher_driver: no CUDA device; nothing run\n");
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "--resources") == 0) return print_resources(argc, argv);
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  std::vector<std::string> custom;  // cases given as BxCxK, e.g. 3x239x4
  for (int a = quick ? 2 : 1; a < argc; ++a) custom.push_back(argv[a]);
  const int shared_max = woodfisher::woodbury_shared_max_block_size();
  std::printf("woodfisher_driver: shared-memory kernel up to c=%d, Woodbury ops up to c=%d, OBS ops up to c=%d\n",
              shared_max, woodfisher::woodbury_max_block_size(), woodfisher::max_block_size());
  std::mt19937 g(1234);

  struct Case { int64_t B; int c, k; };
  std::vector<Case> cases = quick
      ? std::vector<Case>{{1, 1, 1}, {3, 7, 5}, {2, 33, 17}, {1, 50, 35}, {2, 64, 40}, {1, 130, 33},
                          {1, 257, 3}, {1, 260, 34}}
      : std::vector<Case>{{1, 1, 1},    {1000, 1, 16}, {3, 7, 130},  {1000, 7, 16},
                          {1000, 50, 16}, {3, 50, 130}, {1000, 64, 130}, {3, 128, 130},
                          {3, 200, 130}, {1, 207, 16},  {3, 257, 130}, {2, 600, 33}, {1, 1448, 40}};
  if (!custom.empty()) cases.clear();
  for (const std::string& spec : custom) {
    long long B = 0;
    int c = 0, k = 0;
    if (std::sscanf(spec.c_str(), "%lldx%dx%d", &B, &c, &k) != 3 || B < 1 || c < 1 || k < 1) {
      std::fprintf(stderr, "bad case '%s' (expected BxCxK)\n", spec.c_str());
      return 2;
    }
    cases.push_back({B, c, k});
  }
  for (const Case& t : cases) {
    if (t.c <= shared_max) check_woodbury(t.B, t.c, t.k, WoodburyPath::kShared, "shared", g);
    check_woodbury(t.B, t.c, t.k, WoodburyPath::kTiled, "tiled", g);
    check_obs(t.B, t.c, t.k, g);
  }
  if (custom.empty()) {
    for (const WoodburyPath path : {WoodburyPath::kShared, WoodburyPath::kTiled}) {
      const char* name = path == WoodburyPath::kShared ? "shared" : "tiled";
      for (const float damp : {1e-5f, 1e-9f}) {
        check_ill_conditioned(2, 64, 40, damp, path, name, g);   // k < c: accurate
        check_ill_conditioned(2, 68, 100, damp, path, name, g);  // k > c: eps32 kappa, or NaN
      }
    }
  }
  // The shared-memory kernel refuses a block it cannot hold instead of misbehaving.
  Dev<float> dummy(1);
  const cudaError_t refused = woodfisher::woodbury_update(
      dummy.ptr, nullptr, 1, shared_max + 1, 0, 1.0f, nullptr, WoodburyPath::kShared);
  const bool refused_ok = refused == cudaErrorInvalidValue;
  failures += !refused_ok;
  cudaGetLastError();
  std::printf("shared kernel refuses c=%d: %s\n", shared_max + 1, refused_ok ? "ok" : "FAIL");
  const int wmax = woodfisher::woodbury_max_block_size();  // and the tiled kernel beyond its limit
  const bool refused_tiled = woodfisher::woodbury_update(dummy.ptr, nullptr, 1, wmax + 1, 0, 1.0f, nullptr,
                                                         WoodburyPath::kTiled) == cudaErrorInvalidValue;
  failures += !refused_tiled;
  cudaGetLastError();
  std::printf("tiled kernel refuses c=%d: %s\n", wmax + 1, refused_tiled ? "ok" : "FAIL");
  std::printf("woodfisher_driver: %s (%d failure(s))\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
