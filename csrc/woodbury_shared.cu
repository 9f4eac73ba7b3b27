// Fused blockwise Woodbury update with the block resident in shared memory,
// register-blocked rank-K chunks (see woodbury_rank_k.cuh for the chunk algorithm).
//
// One CTA of 256 threads per block (grid-stride over blocks). Shared memory (floats),
// with ld = round_up(c, 4) and kk = chunk width (<= 32, a multiple of 4):
//   F  [ld][ld]      the block (zero padding beyond c)
//   Gt [ld][kk + 4]  the chunk's gradients, transposed (zero rows/columns beyond c / kc);
//                    then the Cholesky's double buffer (at least kk (kk + 1) doubles)
//   Ut [kk][ld]      U^T, then V^T
//   S  [kk][kk + 4]  S, then L^T;   rinv [kk]
// F is read from global memory once (or set to I/damp without reading it) and written
// once. U = F G^T uses the symmetry of F (F[j][r] for F[r][j]) so that both operands are
// contiguous 4-float vectors: 16 FMAs per two 16-byte shared loads. For c = 128 and
// kk = 32 a CTA needs ~102 KB: two CTAs per SM on an H100/H200.
#include "woodbury_rank_k.cuh"

namespace woodfisher {
namespace detail {
namespace {

struct SharedLayout {
  int ld, kk, ldg, lds;
  __host__ __device__ SharedLayout(int c, int kk_) : ld((c + 3) / 4 * 4), kk(kk_), ldg(kk_ + 4), lds(kk_ + 4) {}
  __host__ __device__ int f() const { return 0; }
  __host__ __device__ int gt() const { return ld * ld; }
  __host__ __device__ int gt_floats() const { return ld * ldg > 2 * kk * (kk + 1) ? ld * ldg : 2 * kk * (kk + 1); }
  __host__ __device__ int ut() const { return gt() + gt_floats(); }
  __host__ __device__ int s() const { return ut() + kk * ld; }
  __host__ __device__ int rinv() const { return s() + kk * lds; }
  __host__ __device__ int floats() const { return rinv() + kk; }
};

// Global <-> shared copies of the block move kCopyBatch independent 16-byte vectors per thread
// per step (16 KB per CTA in flight: enough, with 2-3 CTAs per SM, to cover HBM latency).
constexpr int kCopyBatch = 4;

// F (ld x ld, shared) from global memory (c x c), or I/damp; zero padding.
template <bool kVec>
__device__ void load_block(float* F, int ld, const float* src, int c, bool init, float init_diag, int tid) {
  const int quads = ld / 4, total = ld * quads;
  for (int e0 = tid; e0 < total; e0 += kRkThreads * kCopyBatch) {
    float v[kCopyBatch][4];
#pragma unroll
    for (int s = 0; s < kCopyBatch; ++s) {  // all loads first, then all stores
      const int e = e0 + s * kRkThreads, r = e / quads, j = (e % quads) * 4;
      if (init || e >= total) {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[s][q] = (init && r == j + q && r < c) ? init_diag : 0.0f;
      } else {
        ld4_global<kVec>(v[s], src + static_cast<int64_t>(r) * c + j, r < c ? c - j : 0);
      }
    }
#pragma unroll
    for (int s = 0; s < kCopyBatch; ++s) {
      const int e = e0 + s * kRkThreads;
      if (e < total) st4(F + (e / quads) * ld + (e % quads) * 4, v[s][0], v[s][1], v[s][2], v[s][3]);
    }
  }
}

template <bool kVec>
__device__ void store_block(float* dst, const float* F, int ld, int c, int tid) {
  const int quads = ld / 4, total = c * quads;
  for (int e0 = tid; e0 < total; e0 += kRkThreads * kCopyBatch) {
    float v[kCopyBatch][4];
#pragma unroll
    for (int s = 0; s < kCopyBatch; ++s) {
      const int e = e0 + s * kRkThreads;
      if (e < total) ld4(v[s], F + (e / quads) * ld + (e % quads) * 4);
    }
#pragma unroll
    for (int s = 0; s < kCopyBatch; ++s) {
      const int e = e0 + s * kRkThreads, r = e / quads, j = (e % quads) * 4;
      if (e < total) st4_global<kVec>(dst + static_cast<int64_t>(r) * c + j, v[s], c - j);
    }
  }
}

// U^T[i][r] = sum_j F[j][r] G[i][j]: thread (rg, gg) owns rows r0..r0+3, gradients 4gg..4gg+3.
// With init_first (F = I/damp exactly) this is U^T = G / damp, the same bits.
__device__ void u_phase(float* Ut, const float* F, const float* Gt, const SharedLayout& L, int c,
                        bool init_first, float init_diag, int tid) {
  if (init_first) {
    for (int e = tid; e < L.kk * L.ld; e += kRkThreads) {
      const int i = e / L.ld, r = e % L.ld;
      Ut[e] = init_diag * Gt[r * L.ldg + i];
    }
    return;
  }
  const int groups = L.kk / 4, rgs = kRkThreads / groups;
  const int gg = tid % groups, rg = tid / groups;
  if (rg >= rgs) return;
  for (int r0 = rg * 4; r0 < c; r0 += rgs * 4) {
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
    }
    const float* fp = F + r0;
    const float* gp = Gt + gg * 4;
#pragma unroll 4
    for (int j = 0; j < c; ++j) {
      float f[4], g[4];
      ld4(f, fp + j * L.ld);
      ld4(g, gp + j * L.ldg);
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(f[a], g[b], acc[a][b]);
      }
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) st4(Ut + (gg * 4 + b) * L.ld + r0, acc[0][b], acc[1][b], acc[2][b], acc[3][b]);
  }
}

// F -= V V^T over the upper 64 x 64 macro tiles; off-diagonal tiles are also written
// transposed into the lower half (never read in this phase).
__device__ void update_phase(float* F, const float* Vt, int ld, int c, int kc, int tid) {
  int ty = 0, tx = 0;
  update_coords(tid, &ty, &tx);
  for (int mr = 0; mr < c; mr += kMacro) {
    const int row0 = mr + ty * 4;
    for (int mc = mr; mc < c; mc += kMacro) {
      const int col0 = mc + tx * 4;
      if (row0 >= c || col0 >= c) continue;
      float f[4][4];
#pragma unroll
      for (int a = 0; a < 4; ++a) ld4(f[a], F + (row0 + a) * ld + col0);
      rank_k_tile(f, Vt, ld, row0, col0, kc);
#pragma unroll
      for (int a = 0; a < 4; ++a) st4(F + (row0 + a) * ld + col0, f[a][0], f[a][1], f[a][2], f[a][3]);
      if (mc != mr) {
#pragma unroll
        for (int b = 0; b < 4; ++b) st4(F + (col0 + b) * ld + row0, f[0][b], f[1][b], f[2][b], f[3][b]);
      }
    }
  }
}

// kVec: c % 4 == 0 and 16-byte aligned pointers (vector global loads / stores).
template <bool kVec>
__global__ void __launch_bounds__(kRkThreads, 2)
woodbury_shared_kernel(float* __restrict__ inv, const float* __restrict__ grads, int64_t num_blocks,
                       int c, int k, int kk, float num_samples, float init_diag, bool init, bool block_chol) {
  WF_DYNAMIC_SMEM(float, smem);
  const SharedLayout L(c, kk);
  float* F = smem + L.f();
  float* Gt = smem + L.gt();
  float* Ut = smem + L.ut();
  float* S = smem + L.s();
  float* rinv = smem + L.rinv();
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t cc = static_cast<int64_t>(c) * c;

  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    float* Fglob = inv + b * cc;
    const float* G = grads + b * static_cast<int64_t>(k) * c;
    load_block<kVec>(F, L.ld, Fglob, c, init, init_diag, tid);
    for (int start = 0; start < k; start += kk) {
      const int kc = k - start < kk ? k - start : kk;
      const float* Gc = G + static_cast<int64_t>(start) * c;
      for (int e = tid; e < kk * L.ld; e += kRkThreads) {  // Gt[j][i] = G[i][j], coalesced in j
        const int i = e / L.ld, j = e % L.ld;
        Gt[j * L.ldg + i] = (i < kc && j < c) ? Gc[static_cast<int64_t>(i) * c + j] : 0.0f;
      }
      __syncthreads();
      u_phase(Ut, F, Gt, L, c, init && start == 0, init_diag, tid);
      __syncthreads();
      s_phase(S, L.lds, c, kc, kk, Ut, L.ld, tid, [&](float (&g)[4][4], int i0, int r) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // Gt[r + q][i0 .. i0 + 4): zero beyond c and kc
          float t[4];
          ld4(t, Gt + (r + q) * L.ldg + i0);
#pragma unroll
          for (int a = 0; a < 4; ++a) g[a][q] = t[a];
        }
      });
      __syncthreads();
      if (block_chol) {
        chol_phase_block(S, L.lds, reinterpret_cast<double*>(Gt), rinv, c, kc, num_samples, tid);
      } else if (tid < kWarp) {
        chol_phase(S, L.lds, reinterpret_cast<double*>(Gt), rinv, c, kc, num_samples, tid);
      }
      __syncthreads();
      v_phase(Ut, L.ld, c, kc, S, L.lds, rinv, tid);
      __syncthreads();
      update_phase(F, Ut, L.ld, c, kc, tid);
      __syncthreads();  // F, Gt, Ut and S are reused by the next chunk
    }
    store_block<kVec>(Fglob, F, L.ld, c, tid);
    __syncthreads();  // F is reloaded for the next block of this CTA
  }
}

}  // namespace

size_t woodbury_shared_smem_bytes(int block_size, int chunk) {
  return static_cast<size_t>(SharedLayout(block_size, chunk).floats()) * sizeof(float);
}

int woodbury_shared_max_c(int smem_limit, int chunk) {
  int c = 0;
  while (woodbury_shared_smem_bytes(c + 1, chunk) <= static_cast<size_t>(smem_limit)) ++c;
  return c;
}

cudaError_t launch_woodbury_shared(const WoodburyArgs& a, int smem_limit, cudaStream_t stream) {
  const int kk = chunk_width(a.num_grads);
  const size_t bytes = woodbury_shared_smem_bytes(a.block_size, kk);
  if (a.block_size < 1 || bytes > static_cast<size_t>(smem_limit)) return cudaErrorInvalidValue;
  const bool vec = a.block_size % 4 == 0 && aligned16(a.inv) && aligned16(a.grads);
  auto kernel = vec ? woodbury_shared_kernel<true> : woodbury_shared_kernel<false>;
  cudaError_t err = allow_dynamic_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  WF_LAUNCH(kernel, dim3(grid_for(a.num_blocks)), dim3(kRkThreads), bytes, stream, a.inv, a.grads,
            a.num_blocks, a.block_size, a.num_grads, kk, a.num_samples, a.init_diag, a.init, a.block_chol);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace woodfisher
