/* CPU kernel of the blockwise Woodbury build / update (backend "cpu" of woodfisher_kernels).

   The same mathematics and precision as the torch fallback (woodfisher_kernels/_woodbury.py,
   DESIGN.md section 1), fused per block so that the block's inverse stays in L1/L2 and the
   products run in register tiles instead of batched library calls on small matrices:

     F^-1 <- (F^-1 + G^T G / N)^-1, applied K gradients at a time (Woodbury, the paper's Eq. 2
     replayed K rank-one updates at once):
       U = F^-1 G^T (c x K),  S = N I + G U (K x K),  S = L L^T,  W = L^-1 U^T,  F^-1 -= W^T W
     starting from F^-1 = I / damp (build; then U = G^T / damp) or from the given inverse (update).

   Precision: products in float32 (as the torch path's bmm), the K x K system S, its Cholesky
   factor and L^-1 in float64, L^-1 rounded to float32 for W (as the torch path).
   A block fails (flag 1) when a pivot of S is not > 0 in float64, a diagonal entry of the
   result is not > 0, or the result has a non-finite entry (its sum is not finite); the caller
   decides (float64 recomputation or ValueError, woodfisher_kernels/_numerics.py).

   Portability: plain C11 (also valid C++) with GCC / Clang vector extensions (16 floats, 8 doubles); on x86-64
   the kernel is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline,
   chosen at run time (__builtin_cpu_supports). Elsewhere the compiler lowers the vectors to what the
   target has. Blocks are independent: the caller splits them across threads.
   Padding: c is padded to a multiple of 16 and K to a multiple of 8 with zero gradient entries,
   which leave the padded part of the inverse decoupled (exact, not an approximation).

   The low-rank factor (woodfisher_kernels/lowrank.py, m < c) is the same computation with one
   chunk of all m gradients and the inverse never formed: S = N damp I + G G^T, S = L L^T,
   A = L^-1 G and diag(F^-1) = (1 - ||A[:, q]||^2) / damp (lowrank_cpu_kernel.h). */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise under -std=c11 */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define VL 16 /* floats per vector */

typedef float vf __attribute__((vector_size(64), aligned(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));   /* unaligned access */
typedef double vd __attribute__((vector_size(64), aligned(64)));
typedef double vdu __attribute__((vector_size(64), aligned(8)));

/* One instance per instruction set; the entry point picks the best one the CPU has. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WF_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define WF_FN(name) name##_v4
#include "woodbury_cpu_kernel.h"
#include "lowrank_cpu_kernel.h"
#undef WF_FN
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define WF_FN(name) name##_v3
#include "woodbury_cpu_kernel.h"
#include "lowrank_cpu_kernel.h"
#undef WF_FN
#pragma GCC pop_options
#endif
#define WF_FN(name) name##_base
#include "woodbury_cpu_kernel.h"
#include "lowrank_cpu_kernel.h"
#undef WF_FN

/* The entry points keep C names (ctypes looks them up by name) also when a build compiles this
   file as C++, as torch's BuildExtension does with every source it is given. */
#ifdef __cplusplus
extern "C" {
#endif

/* Outputs are fresh memory, mapped on their first write one 4 KiB page fault at a time; on hosts where a
   fault is slow (virtual machines) that costs as much as the arithmetic at c = 64 (benchmarks/results/
   cpu_fallback.md). Asking for transparent huge pages on the output's whole 2 MiB pages first makes that
   512x fewer faults. Only advice: where THP is off ("never") or the call fails nothing changes, and the
   memory is the caller's (torch's allocator frees it as before). */
static void advise_huge_pages(void *p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
  if (hi > lo) (void)madvise((void *)lo, (size_t)(hi - lo), MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

/* Instruction sets: 0 = baseline, 1 = x86-64-v3 (AVX2 + FMA), 2 = x86-64-v4 (AVX-512). */
int wf_best_isa(void) {
#ifdef WF_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return 2;
  if (__builtin_cpu_supports("x86-64-v3")) return 1;
#endif
  return 0;
}

/* Entry point (ctypes, woodfisher_kernels/_cpu.py). isa: as wf_best_isa (tests force each one
   the CPU has; -1 = the best). grads: (nblocks, m, c) float32, contiguous; inv: (nblocks, c, c)
   float32 or NULL (build from I / damp); out: (nblocks, c, c) float32 (may not alias inv or
   grads); bad: (nblocks,) uint8 failure flags; kmax: K, gradients per K x K system (1..64).
   Returns 0; -1 on bad sizes or when the scratch could not be allocated; -2 when the CPU lacks
   the requested instruction set (nothing valid then). Scratch: (c + 16)^2 + 4 K c floats per
   call, freed on return. */
int wf_woodbury_blocks(int isa, const float *grads, const float *inv, float *out, unsigned char *bad,
                       long nblocks, int m, int c, float damp, double num_samples, int kmax) {
  int best = wf_best_isa();
  if (isa < 0) isa = best;
  if (isa > best) return -2;
  if (kmax < 1 || kmax > 64 || c < 1 || m < 0 || nblocks < 0) return -1;
  advise_huge_pages(out, (size_t)nblocks * c * c * sizeof(float));
#ifdef WF_MULTIVERSION
  if (isa == 2) return blocks_v4(grads, inv, out, bad, nblocks, m, c, damp, num_samples, kmax);
  if (isa == 1) return blocks_v3(grads, inv, out, bad, nblocks, m, c, damp, num_samples, kmax);
#endif
  return blocks_base(grads, inv, out, bad, nblocks, m, c, damp, num_samples, kmax);
}

/* Entry point of the low-rank factor (ctypes, woodfisher_kernels/_cpu.py). grads: (nblocks, m, c) float32,
   contiguous; factor: (nblocks, m, c) float32 (A = L^-1 G); diag: (nblocks, c) float32; bad: (nblocks,)
   uint8 failure flags (a pivot of S not > 0 in float64, a diagonal entry not > 0 or not finite).
   Returns 0; -1 on bad sizes or when the scratch could not be allocated; -2 when the CPU lacks the
   requested instruction set. Scratch: 2 mp cp + mp^2 floats and 2 mp^2 doubles per call. */
int wf_lowrank_blocks(int isa, const float *grads, float *factor, float *diag, unsigned char *bad, long nblocks,
                      int m, int c, float damp, double num_samples) {
  int best = wf_best_isa();
  if (isa < 0) isa = best;
  if (isa > best) return -2;
  if (m < 1 || c < 1 || nblocks < 0) return -1;
  advise_huge_pages(factor, (size_t)nblocks * m * c * sizeof(float));
#ifdef WF_MULTIVERSION
  if (isa == 2) return lowrank_blocks_v4(grads, factor, diag, bad, nblocks, m, c, damp, num_samples);
  if (isa == 1) return lowrank_blocks_v3(grads, factor, diag, bad, nblocks, m, c, damp, num_samples);
#endif
  return lowrank_blocks_base(grads, factor, diag, bad, nblocks, m, c, damp, num_samples);
}

#ifdef __cplusplus
}
#endif
