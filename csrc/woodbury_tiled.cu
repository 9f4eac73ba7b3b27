// Register-blocked rank-K Woodbury update for blocks too large for shared memory: the
// c x c block stays in global memory (L2) and is streamed per chunk of kk <= 32 gradients
// (chunk algorithm in woodbury_rank_k.cuh); the chunk width does not shrink with c.
//
// One CTA of 256 threads per block, grid-stride over blocks. Shared memory (floats), with
// ld = round_up(c, 4):
//   Ut [kk][ld]          U^T, then V^T (this bounds c: 1448 for kk = 32 on sm_90)
//   Ft [2][32][128]      double-buffered tiles F[j0 .. j0+32)[r0 .. r0+128) of the U pass
//   Gs [2][32][kk + 4]   the matching gradient tiles, transposed; then the Cholesky's
//                        double buffer (kk (kk + 1) doubles fit for kk <= 32)
//   S  [kk][kk + 4], rinv [kk]
// Per chunk F is read once for U = F G^T (128-row x 32-column tiles; the next tile is
// loaded into registers while the current one is used) and once more, upper 64 x 64 macro
// tiles only, for F -= V V^T (each thread's 4 x 4 tile of the next macro tile is
// prefetched into registers); every tile is written to both halves. The first chunk of
// fisher_inverse reads nothing: U = G^T / damp and the update starts from I / damp.
#include "woodbury_rank_k.cuh"

namespace woodfisher {
namespace detail {
namespace {

constexpr int kRowTile = 128;  // rows of U per pass: 32 row groups x 4
constexpr int kColTile = 32;   // columns j of F per tile

struct TiledLayout {
  int ld, kk, ldg, lds;
  __host__ __device__ TiledLayout(int c, int kk_) : ld((c + 3) / 4 * 4), kk(kk_), ldg(kk_ + 4), lds(kk_ + 4) {}
  __host__ __device__ int ut() const { return 0; }
  __host__ __device__ int ft() const { return kk * ld; }
  __host__ __device__ int gs() const { return ft() + 2 * kColTile * kRowTile; }
  __host__ __device__ int s() const { return gs() + 2 * kColTile * ldg; }
  __host__ __device__ int rinv() const { return s() + kk * lds; }
  __host__ __device__ int floats() const { return rinv() + kk; }
};

// Registers of one (row tile, column tile) step of the U pass: 4 float4 of F, 4 of G.
struct UTile {
  float f[4][4];
  float g[4];
};

// Thread tid's share of tile (r0, j0): F rows j0 + tid/8, columns r0 + (tid%8)*16 .. +16;
// gradient entries G[i][j0 + jj] for the 4 (i, jj) pairs e = tid + 256 s.
template <bool kVec>
__device__ __forceinline__ void fetch_u_tile(UTile& t, const float* F, const float* Gc, int c, int kc,
                                             int r0, int j0, int tid) {
  const int jrow = j0 + tid / 8, col = r0 + (tid % 8) * 16;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int cq = col + 4 * q;
    ld4_global<kVec>(t.f[q], F + static_cast<int64_t>(jrow) * c + cq, jrow < c && cq < c ? c - cq : 0);
  }
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int e = tid + kRkThreads * s, i = e / kColTile, j = j0 + e % kColTile;
    t.g[s] = (i < kc && j < c) ? Gc[static_cast<int64_t>(i) * c + j] : 0.0f;
  }
}

__device__ __forceinline__ void stash_u_tile(const UTile& t, float* Ft, float* Gs, int ldg, int kk, int tid) {
  float* fr = Ft + (tid / 8) * kRowTile + (tid % 8) * 16;
#pragma unroll
  for (int q = 0; q < 4; ++q) st4(fr + 4 * q, t.f[q][0], t.f[q][1], t.f[q][2], t.f[q][3]);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int e = tid + kRkThreads * s, i = e / kColTile;
    if (i < kk) Gs[(e % kColTile) * ldg + i] = t.g[s];
  }
}

// U^T = (F G^T)^T for the chunk, 128 rows at a time; thread (rg, gg) owns rows r0 + 4rg ..,
// gradients 4gg ... Tiles (r0, j0) are visited in order with the next one in registers.
// From I/damp (first chunk of fisher_inverse): U^T = G / damp, the same bits, nothing read.
template <bool kVec>
__device__ void u_phase(float* Ut, float* Ft, float* Gs, const TiledLayout& L, const float* F,
                        const float* Gc, int c, int kc, bool from_eye, float init_diag, int tid) {
  if (from_eye) {
    for (int e = tid; e < L.kk * L.ld; e += kRkThreads) {
      const int i = e / L.ld, r = e % L.ld;
      Ut[e] = (i < kc && r < c) ? init_diag * Gc[static_cast<int64_t>(i) * c + r] : 0.0f;
    }
    return;
  }
  const int gg = tid % 8, rg = tid / 8;
  const bool active = gg * 4 < L.kk;
  const int jt = (c + kColTile - 1) / kColTile, steps = ((c + kRowTile - 1) / kRowTile) * jt;
  UTile next;
  fetch_u_tile<kVec>(next, F, Gc, c, kc, 0, 0, tid);
  float acc[4][4];
  for (int s = 0; s < steps; ++s) {
    const int r0 = (s / jt) * kRowTile, jtile = s % jt, buf = s & 1;
    float* ft = Ft + buf * kColTile * kRowTile;
    float* gs = Gs + buf * kColTile * L.ldg;
    stash_u_tile(next, ft, gs, L.ldg, L.kk, tid);  // buffer buf was last read two steps ago
    __syncthreads();
    if (s + 1 < steps) {
      const int s1 = s + 1;
      fetch_u_tile<kVec>(next, F, Gc, c, kc, (s1 / jt) * kRowTile, (s1 % jt) * kColTile, tid);
    }
    if (jtile == 0) {
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
      }
    }
    if (active) {
      const int jn = c - jtile * kColTile < kColTile ? c - jtile * kColTile : kColTile;
#pragma unroll 4
      for (int jj = 0; jj < jn; ++jj) {
        float f[4], g[4];
        ld4(f, ft + jj * kRowTile + rg * 4);
        ld4(g, gs + jj * L.ldg + gg * 4);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(f[a], g[b], acc[a][b]);
        }
      }
    }
    const int row = r0 + rg * 4;
    if (jtile == jt - 1 && active && row < c) {
#pragma unroll
      for (int b = 0; b < 4; ++b) st4(Ut + (gg * 4 + b) * L.ld + row, acc[0][b], acc[1][b], acc[2][b], acc[3][b]);
    }
  }
}

// Thread's 4 x 4 tile of F at (row0, col0) (rows/columns beyond c read as 0), or of I/damp.
template <bool kVec>
__device__ __forceinline__ void fetch_f_tile(float (&f)[4][4], const float* F, int c, int row0, int col0,
                                             bool from_eye, float init_diag) {
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    if (from_eye) {
#pragma unroll
      for (int b = 0; b < 4; ++b) f[a][b] = row0 + a == col0 + b ? init_diag : 0.0f;
    } else {
      const int r = row0 + a;
      ld4_global<kVec>(f[a], F + static_cast<int64_t>(r) * c + col0, r < c && col0 < c ? c - col0 : 0);
    }
  }
}

// F -= V V^T, upper macro tiles (mr <= mc) visited in a fixed order, the next one prefetched.
template <bool kVec>
__device__ void update_phase(float* F, const float* Vt, int ld, int c, int kc, bool from_eye,
                             float init_diag, int tid) {
  int ty = 0, tx = 0;
  update_coords(tid, &ty, &tx);
  int mr = 0, mc = 0;
  float next[4][4];
  fetch_f_tile<kVec>(next, F, c, ty * 4, tx * 4, from_eye, init_diag);
  while (mr < c) {
    float f[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) f[a][b] = next[a][b];
    }
    const int row0 = mr + ty * 4, col0 = mc + tx * 4;
    int nr = mr, nc = mc + kMacro;
    if (nc >= c) {
      nr += kMacro;
      nc = nr;
    }
    if (nr < c) fetch_f_tile<kVec>(next, F, c, nr + ty * 4, nc + tx * 4, from_eye, init_diag);
    if (row0 < c && col0 < c) {
      rank_k_tile(f, Vt, ld, row0, col0, kc);
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        if (row0 + a < c) st4_global<kVec>(F + static_cast<int64_t>(row0 + a) * c + col0, f[a], c - col0);
      }
      if (mc != mr) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const float t[4] = {f[0][b], f[1][b], f[2][b], f[3][b]};
          if (col0 + b < c) st4_global<kVec>(F + static_cast<int64_t>(col0 + b) * c + row0, t, c - row0);
        }
      }
    }
    mr = nr;
    mc = nc;
  }
}

// kVec: c % 4 == 0 and 16-byte aligned pointers (vector global loads / stores).
template <bool kVec>
__global__ void __launch_bounds__(kRkThreads, 1)
woodbury_tiled_kernel(float* inv, const float* __restrict__ grads, int64_t num_blocks, int c, int k,
                      int kk, float num_samples, float init_diag, bool init, bool block_chol) {
  WF_DYNAMIC_SMEM(float, smem);
  const TiledLayout L(c, kk);
  float* Ut = smem + L.ut();
  float* Ft = smem + L.ft();
  float* Gs = smem + L.gs();
  float* S = smem + L.s();
  float* rinv = smem + L.rinv();
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t cc = static_cast<int64_t>(c) * c;

  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    float* F = inv + b * cc;  // not __restrict__: read after other threads wrote it
    const float* G = grads + b * static_cast<int64_t>(k) * c;
    if (init && k == 0) {  // nothing to update: write I/damp
      for (int64_t e = tid; e < cc; e += kRkThreads) F[e] = e % (c + 1) == 0 ? init_diag : 0.0f;
    }
    for (int start = 0; start < k; start += kk) {
      const int kc = k - start < kk ? k - start : kk;
      const float* Gc = G + static_cast<int64_t>(start) * c;
      const bool from_eye = init && start == 0;
      u_phase<kVec>(Ut, Ft, Gs, L, F, Gc, c, kc, from_eye, init_diag, tid);
      __syncthreads();
      s_phase(S, L.lds, c, kc, kk, Ut, L.ld, tid, [&](float (&g)[4][4], int i0, int r) {
#pragma unroll
        for (int a = 0; a < 4; ++a) {  // G[i0 + a][r .. r + 4) from global memory (L2)
          ld4_global<kVec>(g[a], Gc + static_cast<int64_t>(i0 + a) * c + r, i0 + a < kc ? c - r : 0);
        }
      });
      __syncthreads();
      if (block_chol) {
        chol_phase_block(S, L.lds, reinterpret_cast<double*>(Gs), rinv, c, kc, num_samples, tid);
      } else if (tid < kWarp) {
        chol_phase(S, L.lds, reinterpret_cast<double*>(Gs), rinv, c, kc, num_samples, tid);
      }
      __syncthreads();
      v_phase(Ut, L.ld, c, kc, S, L.lds, rinv, tid);
      __syncthreads();
      update_phase<kVec>(F, Ut, L.ld, c, kc, from_eye, init_diag, tid);
      __syncthreads();  // F (global), Ut and the tiles are reused by the next chunk
    }
  }
}

}  // namespace

size_t woodbury_tiled_smem_bytes(int block_size, int chunk) {
  return static_cast<size_t>(TiledLayout(block_size, chunk).floats()) * sizeof(float);
}

int woodbury_tiled_max_c(int smem_limit, int chunk) {
  const int fixed = TiledLayout(0, chunk).floats();
  const int c = (smem_limit / static_cast<int>(sizeof(float)) - fixed) / chunk;
  return c / 4 * 4;
}

cudaError_t launch_woodbury_tiled(const WoodburyArgs& a, int smem_limit, cudaStream_t stream) {
  const int kk = chunk_width(a.num_grads);
  if (a.block_size < 1 || a.block_size > woodbury_tiled_max_c(smem_limit, kMaxChunk)) {
    return cudaErrorInvalidValue;
  }
  const size_t bytes = woodbury_tiled_smem_bytes(a.block_size, kk);
  const bool vec = a.block_size % 4 == 0 && aligned16(a.inv) && aligned16(a.grads);
  auto kernel = vec ? woodbury_tiled_kernel<true> : woodbury_tiled_kernel<false>;
  cudaError_t err = allow_dynamic_smem(kernel, bytes);
  if (err != cudaSuccess) return err;
  WF_LAUNCH(kernel, dim3(grid_for(a.num_blocks)), dim3(kRkThreads), bytes, stream, a.inv, a.grads,
            a.num_blocks, a.block_size, a.num_grads, kk, a.num_samples, a.init_diag, a.init, a.block_chol);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace woodfisher
