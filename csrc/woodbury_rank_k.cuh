// Device pieces shared by the two register-blocked rank-K Woodbury kernels
// (woodbury_shared.cu: block resident in shared memory; woodbury_tiled.cu: block in
// global memory / L2). One CTA of kRkThreads threads per block; K <= kMaxChunk gradients
// per chunk; a chunk G (kc x c, padded with zero rows to kk, a multiple of 4) does
//
//   U   = F G^T                 (c x kk)  register tiles of 4 rows x 4 gradients
//   S   = G U                   (kk x kk) 4 x 4 tiles, rows split over lanes, shuffle-reduced
//   L   = chol(S + N I)         double precision, warp 0, pivots >= N (see chol_phase)
//   V   = U L^-T                forward substitution, one thread per row
//   F  -= V V^T                 4 x 4 register tiles, upper 64 x 64 macro tiles only,
//                               each written to both halves (F stays exactly symmetric)
//
// which equals kc successive rank-one updates u = F g, F -= u u^T / (N + g.u) in exact
// arithmetic (F - U S^-1 U^T). U and V live in shared memory as U^T (kk x ldu).
#pragma once

#include "wf_compat.cuh"
#include "woodbury_internal.h"

namespace woodfisher {
namespace detail {

constexpr int kRkThreads = 256;
constexpr int kRkWarps = kRkThreads / kWarp;
constexpr int kMacro = 64;  // edge of a macro tile of the F update (16 x 16 threads x 4 x 4)

__device__ __forceinline__ void ld4(float (&v)[4], const float* p) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}

__device__ __forceinline__ void st4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}

// p[0..4) from global memory, entries at or beyond n read as 0. kVec: one 16-byte load; the
// caller guarantees a 16-byte aligned p and n == 0 or n >= 4 (c % 4 == 0, 4-float offsets).
template <bool kVec>
__device__ __forceinline__ void ld4_global(float (&v)[4], const float* p, int n) {
  if (kVec) {
    if (n >= 4) {
      ld4(v, p);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = 0.0f;
    }
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) v[q] = q < n ? p[q] : 0.0f;
}

// p[0..min(n, 4)) = v; kVec: one 16-byte store, under ld4_global's conditions.
template <bool kVec>
__device__ __forceinline__ void st4_global(float* p, const float (&v)[4], int n) {
  if (kVec) {
    if (n >= 4) st4(p, v[0], v[1], v[2], v[3]);
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (q < n) p[q] = v[q];
  }
}

// S[i][l] = sum_r G[i][r] U[r][l] for i, l < kk (S is symmetric up to rounding; the
// Cholesky reads its lower triangle). U^T is in shared memory (Ut[l * ldu + r], zero for r
// in [c, ldu)); load_g(g, i0, r) fills g[a][q] = G[i0 + a][r + q] (0 beyond c / kc). Tile
// (i0, l0) of 4 x 4 per lane group, rows split over `nsl` lanes and summed with an xor
// butterfly (the same bits in every lane). All threads call it.
template <class LoadG>
__device__ __forceinline__ void s_phase(float* S, int lds, int c, int kc, int kk, const float* Ut,
                                        int ldu, int tid, LoadG load_g) {
  const int groups = kk / 4, tiles = groups * groups;
  int tpw = 1;  // tiles per warp: a power of two with 8 * tpw >= tiles
  while (tpw * kRkWarps < tiles) tpw *= 2;
  const int warp = tid / kWarp, lane = tid % kWarp;
  if (warp * tpw >= tiles) return;  // whole warp idle (uniform)
  const int tile = warp * tpw + lane % tpw, slice = lane / tpw, nsl = kWarp / tpw;
  const int i0 = (tile % groups) * 4, l0 = (tile / groups) * 4;
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  }
  if (tile < tiles && i0 < kc && l0 <= i0) {
    for (int r = slice * 4; r < c; r += nsl * 4) {
      float g[4][4], u[4][4];
      load_g(g, i0, r);
#pragma unroll
      for (int b = 0; b < 4; ++b) ld4(u[b], Ut + (l0 + b) * ldu + r);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(g[a][q], u[b][q], acc[a][b]);
        }
      }
    }
  }
  for (int off = tpw; off < kWarp; off *= 2) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] += __shfl_xor_sync(kFullMask, acc[a][b], off);
    }
  }
  if (tile < tiles && slice == 0) {
#pragma unroll
    for (int a = 0; a < 4; ++a) st4(S + (i0 + a) * lds + l0, acc[a][0], acc[a][1], acc[a][2], acc[a][3]);
  }
}

// Cholesky L L^T = S + N I of the leading kc x kc part (lower triangle of S), in double, by
// warp 0 in the double buffer A (kc x (kc + 1), shared memory; lane i owns row i of the
// trailing update, columns read as broadcasts). For a positive definite F every pivot is
// N + g^T F' g >= N. A pivot below N by less than the rounding bound (c + kc) eps32 (N +
// |S_jj|) is floored at N; a larger violation means F has lost definiteness in float32
// (kappa ~ 1 / eps32), and the pivot becomes NaN, which poisons the whole block: the result
// is accurate or visibly invalid, never silently wrong. Overwrites S with
// Lt[i][l] = L[l][i] (l > i) and writes rinv[i] = 1 / L[i][i] (i < kc).
__device__ __forceinline__ void chol_phase(float* S, int lds, double* A, float* rinv, int c, int kc,
                                           float num_samples, int lane) {
  const double n = num_samples, tol = (c + kc) * 1.1920928955078125e-7;  // (c + kc) eps32
  const int lda = kc + 1;
  for (int e = lane; e < kc * kc; e += kWarp) {
    const int i = e / kc, l = e % kc;
    if (l <= i) A[i * lda + l] = static_cast<double>(S[i * lds + l]) + (i == l ? n : 0.0);
  }
  __syncwarp();
  double own_rd = 0.0;  // 1 / L[lane][lane]
  for (int j = 0; j < kc; ++j) {
    const double piv = A[j * lda + j], s_jj = fabs(static_cast<double>(S[j * lds + j]));
    const double d = sqrt(piv >= n ? piv : (piv >= n - tol * (n + s_jj) ? n : -1.0));  // -1: NaN
    const double rd = 1.0 / d;
    if (lane == j) own_rd = rd;
    __syncwarp();  // A[j][j] read by every lane
    if (lane > j && lane < kc) A[lane * lda + j] *= rd;
    if (lane == j) A[j * lda + j] = d;
    __syncwarp();
    if (lane > j && lane < kc) {
      const double lij = A[lane * lda + j];
#pragma unroll 4
      for (int l = j + 1; l <= lane; ++l) A[lane * lda + l] = fma(-lij, A[l * lda + j], A[lane * lda + l]);
    }
    __syncwarp();
  }
  if (lane < kc) {
    rinv[lane] = static_cast<float>(own_rd);
    for (int l = 0; l < lane; ++l) S[l * lds + lane] = static_cast<float>(A[lane * lda + l]);
  }
}

// chol_phase's factorisation with every thread of the CTA instead of warp 0 (experimental,
// WOODFISHER_CUDA_CHOL=block; the same arithmetic in the same order per entry, so the same bits):
// per pivot j each thread recomputes d = sqrt(pivot) and 1/d, and updates its entries (i, l),
// j < l <= i < kc, of the trailing triangle over a fixed kMaxChunk x kMaxChunk grid with the
// scaled column L[i][j] = A[i][j] / d recomputed where read; the scaled column goes straight to
// Lt (S's upper half), A's column j is never written, so one barrier per pivot suffices.
// All threads of the CTA must call it (it holds __syncthreads).
__device__ __forceinline__ void chol_phase_block(float* S, int lds, double* A, float* rinv, int c, int kc,
                                                 float num_samples, int tid) {
  const double n = num_samples, tol = (c + kc) * 1.1920928955078125e-7;  // as chol_phase
  const int lda = kc + 1;
  for (int e = tid; e < kc * kc; e += kRkThreads) {
    const int i = e / kc, l = e % kc;
    if (l <= i) A[i * lda + l] = static_cast<double>(S[i * lds + l]) + (i == l ? n : 0.0);
  }
  __syncthreads();
  for (int j = 0; j < kc; ++j) {
    const double piv = A[j * lda + j], s_jj = fabs(static_cast<double>(S[j * lds + j]));
    const double d = sqrt(piv >= n ? piv : (piv >= n - tol * (n + s_jj) ? n : -1.0));  // -1: NaN
    const double rd = 1.0 / d;
    for (int e = tid; e < kMaxChunk * kMaxChunk; e += kRkThreads) {
      const int i = e / kMaxChunk, l = e % kMaxChunk;
      if (l > j && l <= i && i < kc) {
        const double lij = A[i * lda + j] * rd;
        A[i * lda + l] = fma(-lij, A[l * lda + j] * rd, A[i * lda + l]);
      }
    }
    if (tid > j && tid < kc) S[j * lds + tid] = static_cast<float>(A[tid * lda + j] * rd);
    if (tid == j) rinv[j] = static_cast<float>(rd);
    __syncthreads();
  }
}

// V = U L^-T in place (Ut[i * ldu + r], i < kc): for each pair of rows r, r + 1, L v = u by
// forward substitution (right-looking: x_l -= L[l][i] v_i, L's column i read as Lt's row i),
// in two halves of kHalf gradients so that only kHalf x 2 values are live: the second half
// first subtracts L[l][j] v_j of the first (v_j read back), then solves its own triangle.
// rinv is padded to a multiple of 4 entries.
constexpr int kHalf = kMaxChunk / 2;

__device__ __forceinline__ void v_phase(float* Ut, int ldu, int c, int kc, const float* Lt, int lds,
                                        const float* rinv, int tid) {
  for (int r = 2 * tid; r < c; r += 2 * kRkThreads) {
#pragma unroll
    for (int h = 0; h < kMaxChunk; h += kHalf) {
      if (h >= kc) break;
      float x[kHalf][2];
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float2 t = h + i < kc ? *reinterpret_cast<const float2*>(Ut + (h + i) * ldu + r) : make_float2(0.0f, 0.0f);
        x[i][0] = t.x;
        x[i][1] = t.y;
      }
#pragma unroll
      for (int j = 0; j < h; ++j) {  // earlier half: x_l -= L[l][j] v_j
        const float2 v = *reinterpret_cast<const float2*>(Ut + j * ldu + r);
#pragma unroll
        for (int l4 = 0; l4 < kHalf; l4 += 4) {
          if (h + l4 >= kc) break;
          float lt[4];
          ld4(lt, Lt + j * lds + h + l4);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            x[l4 + q][0] = fmaf(-lt[q], v.x, x[l4 + q][0]);
            x[l4 + q][1] = fmaf(-lt[q], v.y, x[l4 + q][1]);
          }
        }
      }
#pragma unroll
      for (int i4 = 0; i4 < kHalf; i4 += 4) {  // own triangle
        if (h + i4 >= kc) break;
        float ri[4];
        ld4(ri, rinv + h + i4);
#pragma unroll
        for (int i = i4; i < i4 + 4; ++i) {
          x[i][0] *= ri[i - i4];
          x[i][1] *= ri[i - i4];
#pragma unroll
          for (int l4 = (i + 1) / 4 * 4; l4 < kHalf; l4 += 4) {
            if (h + l4 >= kc) break;
            float lt[4];
            ld4(lt, Lt + (h + i) * lds + h + l4);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              if (l4 + q > i) {
                x[l4 + q][0] = fmaf(-lt[q], x[i][0], x[l4 + q][0]);
                x[l4 + q][1] = fmaf(-lt[q], x[i][1], x[l4 + q][1]);
              }
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        if (h + i < kc) *reinterpret_cast<float2*>(Ut + (h + i) * ldu + r) = make_float2(x[i][0], x[i][1]);
      }
    }
  }
}

// f[a][b] -= sum_{i < kc} V[row0 + a][i] V[col0 + b][i], in order of i (the product for
// (r, j) and for (j, r) is the same fma chain, so a symmetric F stays exactly symmetric).
__device__ __forceinline__ void rank_k_tile(float (&f)[4][4], const float* Vt, int ldu, int row0,
                                            int col0, int kc) {
#pragma unroll
  for (int i = 0; i < kMaxChunk; ++i) {
    if (i >= kc) break;
    float vr[4], vc[4];
    ld4(vr, Vt + i * ldu + row0);
    ld4(vc, Vt + i * ldu + col0);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) f[a][b] = fmaf(-vr[a], vc[b], f[a][b]);
    }
  }
}

// Thread (ty, tx) of the 16 x 16 grid of the F update: 4 warps of 4 x 8 lanes per row of
// warps, so a warp's 4-float loads of V touch 4 and 8 distinct vectors (one wavefront each).
__device__ __forceinline__ void update_coords(int tid, int* ty, int* tx) {
  const int warp = tid / kWarp, lane = tid % kWarp;
  *ty = (warp / 2) * 4 + lane / 8;
  *tx = (warp % 2) * 8 + lane % 8;
}

}  // namespace detail
}  // namespace woodfisher
