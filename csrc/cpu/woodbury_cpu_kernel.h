/* Body of the CPU Woodbury kernel, included by woodbury_cpu.c once per instruction set with
   WF_FN(name) naming this instance's functions (name_v4, name_v3, name_base) and, on x86-64 with
   GCC, the target selected by a "#pragma GCC target" around the include: the vector types below
   are then lowered to that set's registers (AVX-512, AVX2 + FMA, or the baseline). See the .c file
   for the mathematics, precision and failure flags. */
static inline vf WF_FN(ld)(const float *p) { return *(const vfu *)p; }
static inline void WF_FN(st)(float *p, vf v) { *(vfu *)p = v; }
static inline vf WF_FN(bc)(float x) { vf v = {x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; return v; }
static inline float WF_FN(hsum)(vf v) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

/* The 16 sums of t[0..15] in one vector, by a tree of shuffles (15 adds instead of 16 horizontal sums);
   lane HSUM16_LANE(q) holds the sum of t[q]. */
#ifndef HSUM16_LANE
#define HSUM16_LANE(q) ((((q) & 1) << 3) | (((q) & 2) << 1) | (((q) & 4) >> 1) | (((q) & 8) >> 3))
#endif
static inline vf WF_FN(hsum16)(const vf *t) {
  vf u[8], v[4], w[2];
  for (int q = 0; q < 8; q++)   /* lanes 0-7: halves of t[2q], 8-15: of t[2q + 1] */
    u[q] = __builtin_shufflevector(t[2 * q], t[2 * q + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(t[2 * q], t[2 * q + 1],
                                   8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int q = 0; q < 4; q++)
    v[q] = __builtin_shufflevector(u[2 * q], u[2 * q + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(u[2 * q], u[2 * q + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int q = 0; q < 2; q++)
    w[q] = __builtin_shufflevector(v[2 * q], v[2 * q + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(v[2 * q], v[2 * q + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(w[0], w[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(w[0], w[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

/* The 4 x 4 dot products x[i] . y[k] of rows x[0..3] and y[0..3] (row stride ld, width a multiple of 16),
   each summed in float32: a 4 x 4 register tile over the width, then one shuffle tree; lane
   HSUM16_LANE(4 i + k) of the result holds x[i] . y[k]. */
static inline __attribute__((always_inline)) vf WF_FN(dots4x4)(const float *x, const float *y, int ld, int width) {
  const float *x0 = x, *x1 = x0 + ld, *x2 = x1 + ld, *x3 = x2 + ld;
  const float *y0 = y, *y1 = y0 + ld, *y2 = y1 + ld, *y3 = y2 + ld;
  vf t[16];
  for (int q = 0; q < 16; q++) t[q] = WF_FN(bc)(0);
  for (int j = 0; j < width; j += 16) {
    vf p0 = WF_FN(ld)(x0 + j), p1 = WF_FN(ld)(x1 + j), p2 = WF_FN(ld)(x2 + j), p3 = WF_FN(ld)(x3 + j);
    vf q0 = WF_FN(ld)(y0 + j), q1 = WF_FN(ld)(y1 + j), q2 = WF_FN(ld)(y2 + j), q3 = WF_FN(ld)(y3 + j);
    t[0] += p0 * q0; t[1] += p0 * q1; t[2] += p0 * q2; t[3] += p0 * q3;
    t[4] += p1 * q0; t[5] += p1 * q1; t[6] += p1 * q2; t[7] += p1 * q3;
    t[8] += p2 * q0; t[9] += p2 * q1; t[10] += p2 * q2; t[11] += p2 * q3;
    t[12] += p3 * q0; t[13] += p3 * q1; t[14] += p3 * q2; t[15] += p3 * q3;
  }
  return WF_FN(hsum16)(t);
}

/* ut (kp x cp) = g (kp x cp) . o (cp x cp): rows of g four at a time, 64 (then 16) columns of o
   in 16 vector registers. ut = (o g^T)^T as o is symmetric. */
static inline void WF_FN(gemm_ut)(const float *g, const float *o, float *ut, int kp, int cp) {
  for (int k = 0; k < kp; k += 4) {
    const float *g0 = g + (size_t)k * cp, *g1 = g0 + cp, *g2 = g1 + cp, *g3 = g2 + cp;
    int j = 0;
    for (; j + 64 <= cp; j += 64) {
      vf a00 = WF_FN(bc)(0), a01 = WF_FN(bc)(0), a02 = WF_FN(bc)(0), a03 = WF_FN(bc)(0), a10 = WF_FN(bc)(0), a11 = WF_FN(bc)(0), a12 = WF_FN(bc)(0), a13 = WF_FN(bc)(0);
      vf a20 = WF_FN(bc)(0), a21 = WF_FN(bc)(0), a22 = WF_FN(bc)(0), a23 = WF_FN(bc)(0), a30 = WF_FN(bc)(0), a31 = WF_FN(bc)(0), a32 = WF_FN(bc)(0), a33 = WF_FN(bc)(0);
      for (int i = 0; i < cp; i++) {
        const float *orow = o + (size_t)i * cp + j;
        vf o0 = WF_FN(ld)(orow), o1 = WF_FN(ld)(orow + 16), o2 = WF_FN(ld)(orow + 32), o3 = WF_FN(ld)(orow + 48);
        vf b0 = WF_FN(bc)(g0[i]), b1 = WF_FN(bc)(g1[i]), b2 = WF_FN(bc)(g2[i]), b3 = WF_FN(bc)(g3[i]);
        a00 += b0 * o0; a01 += b0 * o1; a02 += b0 * o2; a03 += b0 * o3;
        a10 += b1 * o0; a11 += b1 * o1; a12 += b1 * o2; a13 += b1 * o3;
        a20 += b2 * o0; a21 += b2 * o1; a22 += b2 * o2; a23 += b2 * o3;
        a30 += b3 * o0; a31 += b3 * o1; a32 += b3 * o2; a33 += b3 * o3;
      }
      float *u0 = ut + (size_t)k * cp + j;
      WF_FN(st)(u0, a00); WF_FN(st)(u0 + 16, a01); WF_FN(st)(u0 + 32, a02); WF_FN(st)(u0 + 48, a03); u0 += cp;
      WF_FN(st)(u0, a10); WF_FN(st)(u0 + 16, a11); WF_FN(st)(u0 + 32, a12); WF_FN(st)(u0 + 48, a13); u0 += cp;
      WF_FN(st)(u0, a20); WF_FN(st)(u0 + 16, a21); WF_FN(st)(u0 + 32, a22); WF_FN(st)(u0 + 48, a23); u0 += cp;
      WF_FN(st)(u0, a30); WF_FN(st)(u0 + 16, a31); WF_FN(st)(u0 + 32, a32); WF_FN(st)(u0 + 48, a33);
    }
    for (; j < cp; j += 16) {
      vf a0 = WF_FN(bc)(0), a1 = WF_FN(bc)(0), a2 = WF_FN(bc)(0), a3 = WF_FN(bc)(0);
      for (int i = 0; i < cp; i++) {
        vf ov = WF_FN(ld)(o + (size_t)i * cp + j);
        a0 += WF_FN(bc)(g0[i]) * ov; a1 += WF_FN(bc)(g1[i]) * ov; a2 += WF_FN(bc)(g2[i]) * ov; a3 += WF_FN(bc)(g3[i]) * ov;
      }
      float *u0 = ut + (size_t)k * cp + j;
      WF_FN(st)(u0, a0); WF_FN(st)(u0 + cp, a1); WF_FN(st)(u0 + 2 * cp, a2); WF_FN(st)(u0 + 3 * cp, a3);
    }
  }
}

/* o (cp x cp) -= w^T w, w (kp x cp): a 4 x 64 (then 4 x 16) tile of w^T w in registers per pass over k.
   init: o = -w^T w (o is not read: the first chunk of a build, before the diagonal I / damp is added). */
static inline void WF_FN(syrk_sub)(const float *w, float *o, int kp, int cp, int init) {
  /* the products are summed over k in registers first and subtracted from o once per chunk:
     one rounding at o's magnitude, as the torch fallback's baddbmm (not one per gradient) */
  const vf zero = WF_FN(bc)(0);
#define SUB(p, acc) WF_FN(st)(p, (init ? zero : WF_FN(ld)(p)) - (acc))
  for (int i = 0; i < cp; i += 4) {
    int j = 0;
    for (; j + 64 <= cp; j += 64) {
      float *r0 = o + (size_t)i * cp + j, *r1 = r0 + cp, *r2 = r1 + cp, *r3 = r2 + cp;
      vf a00 = WF_FN(bc)(0), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
      vf a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
      /* two pointers walking down the rows of w (not w + k cp recomputed): fewer live integer registers,
         no loop counter spilled to the stack (3-4% of a whole build in paired runs of the kernel alone) */
      const float *pj = w + j, *pi = w + i;
      for (int k = 0; k < kp; k++, pj += cp, pi += cp) {
        vf w0 = WF_FN(ld)(pj), w1 = WF_FN(ld)(pj + 16), w2 = WF_FN(ld)(pj + 32), w3 = WF_FN(ld)(pj + 48);
        vf b0 = WF_FN(bc)(pi[0]), b1 = WF_FN(bc)(pi[1]), b2 = WF_FN(bc)(pi[2]), b3 = WF_FN(bc)(pi[3]);
        a00 += b0 * w0; a01 += b0 * w1; a02 += b0 * w2; a03 += b0 * w3;
        a10 += b1 * w0; a11 += b1 * w1; a12 += b1 * w2; a13 += b1 * w3;
        a20 += b2 * w0; a21 += b2 * w1; a22 += b2 * w2; a23 += b2 * w3;
        a30 += b3 * w0; a31 += b3 * w1; a32 += b3 * w2; a33 += b3 * w3;
      }
      SUB(r0, a00); SUB(r0 + 16, a01); SUB(r0 + 32, a02); SUB(r0 + 48, a03);
      SUB(r1, a10); SUB(r1 + 16, a11); SUB(r1 + 32, a12); SUB(r1 + 48, a13);
      SUB(r2, a20); SUB(r2 + 16, a21); SUB(r2 + 32, a22); SUB(r2 + 48, a23);
      SUB(r3, a30); SUB(r3 + 16, a31); SUB(r3 + 32, a32); SUB(r3 + 48, a33);
    }
    for (; j < cp; j += 16) {
      float *r0 = o + (size_t)i * cp + j;
      vf a0 = WF_FN(bc)(0), a1 = a0, a2 = a0, a3 = a0;
      for (int k = 0; k < kp; k++) {
        const float *wk = w + (size_t)k * cp;
        vf wv = WF_FN(ld)(wk + j);
        a0 += WF_FN(bc)(wk[i]) * wv; a1 += WF_FN(bc)(wk[i + 1]) * wv;
        a2 += WF_FN(bc)(wk[i + 2]) * wv; a3 += WF_FN(bc)(wk[i + 3]) * wv;
      }
      SUB(r0, a0); SUB(r0 + cp, a1); SUB(r0 + 2 * cp, a2); SUB(r0 + 3 * cp, a3);
    }
  }
}
#undef SUB

/* Cholesky S = U^T U (kp x kp, float64, kp a multiple of 8) and l = L^-1 = U^-T (lower, float64;
   zeros above the diagonal), rounded to float32 in linv. Both in one right-looking elimination on
   [S | I]: step j scales row j by 1 / sqrt(pivot) and subtracts U[j][a] times it from every row a > j,
   so S becomes U and I becomes the product of the row operations, M with M S = U, i.e. M = U^-T.
   Blocked by 8 rows (one vector): the steps of a panel of 8 rows are applied to the panel itself one
   at a time, then to every later row at once, the 8 products summed in registers before the row is
   read and written (8x fewer loads and stores than a row update per step, and no chain of dependent
   multiply-adds as a forward substitution by rows has; that made L^-1 half of a 64 x 64 low-rank
   block's time). Only the live part of each row is touched (row a of S from column a on, row a of l
   up to the panel). s is overwritten by U from the diagonal on (the entries left of the diagonal are
   never read). Returns 1 when a pivot is not > 0 (or not finite); it is then replaced by 1 so that
   the arithmetic stays finite. */
static inline int WF_FN(chol_linv)(double *s, double *l, float *linv, int kp) {
  typedef float v8f __attribute__((vector_size(32), aligned(4)));
  int failed = 0, nv = kp / 8;
  memset(l, 0, sizeof(double) * (size_t)kp * kp);
  for (int a = 0; a < kp; a++) l[a * kp + a] = 1.0;
  for (int jb = 0; jb < kp; jb += 8) {
    int vb = jb / 8;   /* the panel's slice: l rows of the panel live in slices 0 .. vb */
    for (int j = jb; j < jb + 8; j++) {
      double piv = s[j * kp + j];
      if (!(piv > 0) || !isfinite(piv)) { failed = 1; piv = 1.0; }
      vd rd = {0}; rd += 1.0 / sqrt(piv);
      vdu *uj = (vdu *)(s + j * kp), *lj = (vdu *)(l + j * kp);
      for (int v = vb; v < nv; v++) uj[v] *= rd;
      for (int v = 0; v <= vb; v++) lj[v] *= rd;
      for (int a = j + 1; a < jb + 8; a++) {
        vd f = {0}; f += s[j * kp + a];
        vdu *sa = (vdu *)(s + a * kp), *la = (vdu *)(l + a * kp);
        for (int v = vb; v < nv; v++) sa[v] -= f * uj[v];
        for (int v = 0; v <= vb; v++) la[v] -= f * lj[v];
      }
    }
    const vdu *u = (const vdu *)(s + jb * kp), *m = (const vdu *)(l + jb * kp);   /* panel rows, stride nv */
    for (int a = jb + 8; a < kp; a++) {
      const double *fa = s + (size_t)jb * kp + a;   /* U[jb + t][a] = fa[t kp] */
      vd f0 = {0}, f1 = {0}, f2 = {0}, f3 = {0}, f4 = {0}, f5 = {0}, f6 = {0}, f7 = {0};
      f0 += fa[0]; f1 += fa[kp]; f2 += fa[2 * kp]; f3 += fa[3 * kp];
      f4 += fa[4 * kp]; f5 += fa[5 * kp]; f6 += fa[6 * kp]; f7 += fa[7 * kp];
      vdu *sa = (vdu *)(s + a * kp), *la = (vdu *)(l + a * kp);
#define PANEL(x, v) ((f0 * x[v] + f1 * x[nv + v] + f2 * x[2 * nv + v] + f3 * x[3 * nv + v]) + \
                     (f4 * x[4 * nv + v] + f5 * x[5 * nv + v] + f6 * x[6 * nv + v] + f7 * x[7 * nv + v]))
      for (int v = a / 8; v < nv; v++) sa[v] -= PANEL(u, v);
      for (int v = 0; v <= vb; v++) la[v] -= PANEL(m, v);
#undef PANEL
    }
  }
  for (size_t q = 0; q < (size_t)kp * kp; q += 8)
    *(v8f *)(linv + q) = __builtin_convertvector(*(const vdu *)(l + q), v8f);
  return failed;
}

/* One block. grads: m x c (row-major); inv_in: c x c, or NULL to start from I / damp; out: c x c.
   Scratch (64-byte aligned): o cp x cp (unused when c = cp: the output block is used), pad / ut / w
   kmax8 x cp floats, linv kmax8^2 floats,
   s / l kmax8^2 doubles (kmax8 = kmax rounded up to 8). Returns 1 when the block failed. */
static inline int WF_FN(one_block)(const float *grads, int m, int c, const float *inv_in, float damp, double num_samples,
                        int kmax, float *out, float *o, float *pad, float *ut, float *w, double *s, double *l,
                        float *linv) {
  int cp = (c + VL - 1) / VL * VL;
  int failed = 0;
  int direct = (cp == c);   /* no padding: work in the output block and read full chunks in place */
  if (direct) o = out;
  if (inv_in && direct) {
    memcpy(o, inv_in, sizeof(float) * (size_t)c * c);
  } else if (inv_in || m == 0) {
    memset(o, 0, sizeof(float) * cp * cp);
    if (inv_in) {
      for (int i = 0; i < c; i++) memcpy(o + (size_t)i * cp, inv_in + (size_t)i * c, sizeof(float) * c);
      for (int i = c; i < cp; i++) o[(size_t)i * cp + i] = 1.0f;
    } else {
      for (int i = 0; i < cp; i++) o[(size_t)i * cp + i] = 1.0f / damp;
    }
  }   /* else (a build): the first chunk writes o = -W^T W, then I / damp is added to its diagonal */
  /* pad: the zero-padded chunk buffer (tail chunks, or c not a multiple of 16) */
  for (int j0 = 0; j0 < m; j0 += kmax) {
    int k = m - j0 < kmax ? m - j0 : kmax;
    int kp = (k + 7) / 8 * 8;
    const float *gk = pad;
    if (direct && k == kp) {
      gk = grads + (size_t)j0 * c;
    } else {
      memset(pad, 0, sizeof(float) * kp * cp);
      for (int r = 0; r < k; r++) memcpy(pad + (size_t)r * cp, grads + (size_t)(j0 + r) * c, sizeof(float) * c);
    }
    int first = (j0 == 0 && !inv_in);
    if (first) {
      float inv_d = 1.0f / damp;
      for (size_t q = 0; q < (size_t)kp * cp; q++) ut[q] = gk[q] * inv_d;
    } else {
      WF_FN(gemm_ut)(gk, o, ut, kp, cp);
    }
    /* S = N I + gk ut^T (kp x kp): float products, float64 from here on; 4 x 4 tiles of dot products
       at and below the diagonal, entry (a, b <= a) mirrored to (b, a) */
    for (int a = 0; a < kp; a += 4) {
      for (int b = 0; b <= a; b += 4) {
        vf sum = WF_FN(dots4x4)(gk + (size_t)a * cp, ut + (size_t)b * cp, cp, cp);
        for (int i = 0; i < 4; i++)
          for (int k = 0; k < 4 && b + k <= a + i; k++)
            s[(a + i) * kp + b + k] = s[(b + k) * kp + a + i] = sum[HSUM16_LANE(4 * i + k)];
      }
    }
    for (int a = 0; a < kp; a++) s[a * kp + a] += num_samples;
    if (WF_FN(chol_linv)(s, l, linv, kp)) failed = 1;
    /* W = linv ut (kp x cp) */
    for (int a = 0; a < kp; a++) {
      float *wa = w + (size_t)a * cp;
      for (int j = 0; j < cp; j += 16) {
        vf acc = WF_FN(bc)(0);
        for (int q = 0; q <= a; q++) acc += WF_FN(bc)(linv[a * kp + q]) * WF_FN(ld)(ut + (size_t)q * cp + j);
        WF_FN(st)(wa + j, acc);
      }
    }
    WF_FN(syrk_sub)(w, o, kp, cp, first);
    if (first)
      for (int i = 0; i < cp; i++) o[(size_t)i * cp + i] += 1.0f / damp;
  }
  vf acc = WF_FN(bc)(0);
  for (int i = 0; i < c; i++) {
    const float *oi = o + (size_t)i * cp;
    if (!direct) memcpy(out + (size_t)i * c, oi, sizeof(float) * c);
    if (!(oi[i] > 0)) failed = 1;
    for (int j = 0; j < cp; j += 16) acc += WF_FN(ld)(oi + j);
  }
  if (!isfinite(WF_FN(hsum)(acc))) failed = 1;
  return failed;
}

/* Blocks lo..: the loop of wf_woodbury_blocks for this instruction set (see there). */
static int WF_FN(blocks)(const float *grads, const float *inv, float *out, unsigned char *bad, long nblocks,
                         int m, int c, float damp, double num_samples, int kmax) {
  int cp = (c + VL - 1) / VL * VL;
  int k8 = (kmax + 7) / 8 * 8;
  size_t nf = (size_t)cp * cp + 3 * (size_t)k8 * cp + (size_t)k8 * k8;
  float *fbuf = (float *)aligned_alloc(64, (nf * sizeof(float) + 63) / 64 * 64);
  double *dbuf = (double *)aligned_alloc(64, (2 * (size_t)k8 * k8 * sizeof(double) + 63) / 64 * 64);
  if (!fbuf || !dbuf) { free(fbuf); free(dbuf); return -1; }
  float *o = fbuf, *gk = o + (size_t)cp * cp, *ut = gk + (size_t)k8 * cp, *w = ut + (size_t)k8 * cp;
  float *linv = w + (size_t)k8 * cp;
  double *s = dbuf, *l = dbuf + (size_t)k8 * k8;
  for (long b = 0; b < nblocks; b++) {
    bad[b] = (unsigned char)WF_FN(one_block)(grads + (size_t)b * m * c, m, c, inv ? inv + (size_t)b * c * c : NULL,
                                             damp, num_samples, kmax, out + (size_t)b * c * c, o, gk, ut, w, s, l,
                                             linv);
  }
  free(fbuf);
  free(dbuf);
  return 0;
}
