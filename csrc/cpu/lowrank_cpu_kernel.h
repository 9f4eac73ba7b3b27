/* Body of the CPU low-rank factor kernel, included by woodbury_cpu.c once per instruction set after
   woodbury_cpu_kernel.h (it uses that file's vector helpers and chol_linv). See the .c file for the
   mathematics; per block (G: m x c gradients, m < c):
     S = N damp I + G G^T (m x m: float32 products summed over column panels, the panels' sums in float64),
     S = L L^T,
     A = L^-1 G (m x c, L^-1 computed in float64 and rounded to float32),
     diag(F^-1) = (1 - sum_a A[a, :]^2) / damp (squares summed in float32 over 32 rows, then float64). */

/* s (mp x mp, both triangles) += g g^T over the columns 0..width-1 of g (mp rows, row stride ld):
   4 x 4 tiles of dot products (dots4x4), each summed in float32 over the panel (as the torch path's bmm)
   and added to s in float64. */
static inline void WF_FN(gram_add)(const float *g, double *s, int mp, int ld, int width) {
  for (int a = 0; a < mp; a += 4) {
    for (int b = 0; b <= a; b += 4) {
      vf sum = WF_FN(dots4x4)(g + (size_t)a * ld, g + (size_t)b * ld, ld, width);
      for (int i = 0; i < 4; i++)
        for (int k = 0; k < 4; k++) {
          double v = (double)sum[HSUM16_LANE(4 * i + k)];
          s[(size_t)(a + i) * mp + b + k] += v;
          if (b < a) s[(size_t)(b + k) * mp + a + i] += v;   /* a diagonal tile holds both (i, k) and (k, i) */
        }
    }
  }
}

/* a = linv (mp x mp, lower, zeros above) . g over the columns 0..width-1 of g and a (mp rows, row stride ld):
   4 rows x 64 (then 16) columns in registers. */
static inline void WF_FN(trmm)(const float *linv, const float *g, float *a, int mp, int ld, int width) {
  for (int r = 0; r < mp; r += 4) {
    const float *l0 = linv + (size_t)r * mp, *l1 = l0 + mp, *l2 = l1 + mp, *l3 = l2 + mp;
    int j = 0;
    for (; j + 64 <= width; j += 64) {
      vf t[16];
      for (int i = 0; i < 16; i++) t[i] = WF_FN(bc)(0);
      for (int q = 0; q < r + 4; q++) {
        const float *gq = g + (size_t)q * ld + j;
        vf g0 = WF_FN(ld)(gq), g1 = WF_FN(ld)(gq + 16), g2 = WF_FN(ld)(gq + 32), g3 = WF_FN(ld)(gq + 48);
        vf b0 = WF_FN(bc)(l0[q]), b1 = WF_FN(bc)(l1[q]), b2 = WF_FN(bc)(l2[q]), b3 = WF_FN(bc)(l3[q]);
        t[0] += b0 * g0; t[1] += b0 * g1; t[2] += b0 * g2; t[3] += b0 * g3;
        t[4] += b1 * g0; t[5] += b1 * g1; t[6] += b1 * g2; t[7] += b1 * g3;
        t[8] += b2 * g0; t[9] += b2 * g1; t[10] += b2 * g2; t[11] += b2 * g3;
        t[12] += b3 * g0; t[13] += b3 * g1; t[14] += b3 * g2; t[15] += b3 * g3;
      }
      for (int i = 0; i < 4; i++)
        for (int k = 0; k < 4; k++) WF_FN(st)(a + (size_t)(r + i) * ld + j + 16 * k, t[4 * i + k]);
    }
    for (; j < width; j += 16) {
      vf t0 = WF_FN(bc)(0), t1 = t0, t2 = t0, t3 = t0;
      for (int q = 0; q < r + 4; q++) {
        vf gv = WF_FN(ld)(g + (size_t)q * ld + j);
        t0 += WF_FN(bc)(l0[q]) * gv; t1 += WF_FN(bc)(l1[q]) * gv;
        t2 += WF_FN(bc)(l2[q]) * gv; t3 += WF_FN(bc)(l3[q]) * gv;
      }
      float *ar = a + (size_t)r * ld + j;
      WF_FN(st)(ar, t0); WF_FN(st)(ar + ld, t1); WF_FN(st)(ar + 2 * ld, t2); WF_FN(st)(ar + 3 * ld, t3);
    }
  }
}

/* One block of the low-rank factor. g: m x c; out_a: m x c (A); out_diag: c. Scratch (64-byte aligned):
   gp, ap: mp x cp floats (used when c or m needs padding), linv: mp^2 floats, s, l: mp^2 doubles
   (mp = m rounded up to 8, cp = c rounded up to 16). Returns 1 when the block failed. */
static inline int WF_FN(lowrank_block)(const float *g, int m, int c, float damp, double num_samples, float *out_a,
                                       float *out_diag, float *gp, float *ap, float *linv, double *s, double *l) {
  int cp = (c + VL - 1) / VL * VL, mp = (m + 7) / 8 * 8;
  int direct = (cp == c && mp == m);   /* no padding: read G and write A in place */
  const float *gg = g;
  float *a = out_a;
  if (!direct) {
    memset(gp, 0, sizeof(float) * (size_t)mp * cp);
    for (int r = 0; r < m; r++) memcpy(gp + (size_t)r * cp, g + (size_t)r * c, sizeof(float) * c);
    gg = gp;
    a = ap;
  }
  /* column panels of about 256 KiB of G: each stays in L2 while it is used (blocks wider than that) */
  int panel = 65536 / mp / 64 * 64;
  if (panel < 64) panel = 64;
  memset(s, 0, sizeof(double) * (size_t)mp * mp);
  for (int p0 = 0; p0 < cp; p0 += panel)
    WF_FN(gram_add)(gg + p0, s, mp, cp, cp - p0 < panel ? cp - p0 : panel);
  double nd = num_samples * (double)damp;
  for (int r = 0; r < mp; r++) s[(size_t)r * mp + r] += nd;   /* padded rows: N damp alone (decoupled) */
  int failed = WF_FN(chol_linv)(s, l, linv, mp);
  for (int p0 = 0; p0 < cp; p0 += panel) {
    int width = cp - p0 < panel ? cp - p0 : panel;
    WF_FN(trmm)(linv, gg + p0, a + p0, mp, cp, width);
    for (int j = p0; j < p0 + width; j += 16) {   /* the panel's diagonal entries, while A is in cache */
      vd lo = {0}, hi = lo;
      for (int r0 = 0; r0 < mp; r0 += 32) {
        vf acc = WF_FN(bc)(0);
        int r1 = r0 + 32 < mp ? r0 + 32 : mp;
        for (int r = r0; r < r1; r++) {
          vf v = WF_FN(ld)(a + (size_t)r * cp + j);
          acc += v * v;
        }
        lo += __builtin_convertvector(__builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7), vd);
        hi += __builtin_convertvector(__builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15), vd);
      }
      for (int k = 0; k < 16 && j + k < c; k++) {
        float d = (float)((1.0 - (k < 8 ? lo[k] : hi[k - 8])) / (double)damp);
        out_diag[j + k] = d;
        if (!(d > 0) || !isfinite(d)) failed = 1;
      }
    }
  }
  if (!direct)
    for (int r = 0; r < m; r++) memcpy(out_a + (size_t)r * c, a + (size_t)r * cp, sizeof(float) * c);
  return failed;
}

/* The loop of wf_lowrank_blocks for this instruction set (see there). */
static int WF_FN(lowrank_blocks)(const float *grads, float *factor, float *diag, unsigned char *bad, long nblocks,
                                 int m, int c, float damp, double num_samples) {
  int cp = (c + VL - 1) / VL * VL, mp = (m + 7) / 8 * 8;
  size_t nf = 2 * (size_t)mp * cp + (size_t)mp * mp;
  float *fbuf = (float *)aligned_alloc(64, (nf * sizeof(float) + 63) / 64 * 64);
  double *dbuf = (double *)aligned_alloc(64, (2 * (size_t)mp * mp * sizeof(double) + 63) / 64 * 64);
  if (!fbuf || !dbuf) { free(fbuf); free(dbuf); return -1; }
  float *gp = fbuf, *ap = gp + (size_t)mp * cp, *linv = ap + (size_t)mp * cp;
  for (long b = 0; b < nblocks; b++)
    bad[b] = (unsigned char)WF_FN(lowrank_block)(grads + (size_t)b * m * c, m, c, damp, num_samples,
                                                 factor + (size_t)b * m * c, diag + (size_t)b * c, gp, ap, linv,
                                                 dbuf, dbuf + (size_t)mp * mp);
  free(fbuf);
  free(dbuf);
  return 0;
}
