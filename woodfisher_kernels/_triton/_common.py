"""Pieces shared by the Triton kernels: the reduction combiner, IEEE division / square root,
the pivot rule and the K x K subspace factor of the Woodbury kernels."""
import triton
import triton.language as tl

# The combiner that ``tl.sum`` reduces with (present in triton 2.x and 3.x). Kernels call
# ``tl.reduce(x, axis, SUM)`` in their hot loops: identical code on the GPU, but the
# interpreter (TRITON_INTERPRET=1) re-patches the language on every nested ``@jit`` call
# such as ``tl.sum`` (milliseconds each), while ``tl.reduce`` with this combiner maps
# straight to ``numpy.sum``.
SUM = getattr(tl.standard, "_sum_combine", None)
if SUM is None:  # pragma: no cover - older / newer triton without the private name
    @triton.jit
    def SUM(a, b):
        return a + b

# float32 ``/`` and ``tl.sqrt`` lower to PTX div.full.f32 / sqrt.approx.ftz.f32 (not IEEE).
# tl.div_rn / tl.sqrt_rn (triton >= 3.0) are correctly rounded; older versions get the same
# PTX instructions through inline assembly (GPU only). float64 ``/`` and ``tl.sqrt`` are IEEE.
# (Wrappers, not aliases: the interpreter patches the ``tl`` builtins, not copies of them.)
if hasattr(tl, "div_rn") and hasattr(tl, "sqrt_rn"):
    @triton.jit
    def div_rn(x, y):
        return tl.div_rn(x, y)

    @triton.jit
    def sqrt_rn(x):
        return tl.sqrt_rn(x)
else:  # pragma: no cover - triton < 3.0
    @triton.jit
    def div_rn(x, y):
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [x, y],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def sqrt_rn(x):
        return tl.inline_asm_elementwise("sqrt.rn.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)

EPS32 = 1.1920928955078125e-07


def _supports_maxnreg() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - no NVIDIA backend
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


# An explicit register limit (PTX .maxnreg 255): without one, the ptxas bundled with triton
# 3.6 caps some Woodbury variants at 128 registers and spills (scripts/triton_spec_compile.py).
REG_LIMIT = {"maxnreg": 255} if _supports_maxnreg() else {}


@triton.jit
def safe_pivot(d, n, scale, tol):
    """Pivot ``d = N + g^T F' g`` of a Sherman-Morrison step (``>= N`` for a positive
    definite F). A value below N by at most ``tol * scale`` (the rounding bound) is floored
    at N; a larger violation means F has lost definiteness in float32 and gives -1, whose
    square root is NaN: the block becomes NaN instead of silently wrong."""
    return tl.where(d >= n, d, tl.where(d >= n - tol * scale, n, -1.0))


@triton.jit
def subspace_factor(s, num_samples, count, tol, K: tl.constexpr):
    """Replay ``count`` (<= K) rank-one Sherman-Morrison steps inside the span of K gradients.

    ``s`` (K, K) is ``G F G^T`` (symmetric). Step i uses ``u_i = U c_i`` (``U = F G^T``,
    ``c_i`` the i-th column of the running coefficient matrix) and the pivot
    ``d_i = N + s_ii`` (``safe_pivot``, against the scale ``N + |G F G^T|_ii``); both ``s``
    and the coefficients are updated as ``F`` would be. Returns ``a`` (K, K) float32 with
    columns ``c_i / sqrt(d_i)`` (zero beyond ``count``): the corrections sum to
    ``(U a)(U a)^T``. Computed in float64; zero (padded) gradients change nothing.
    """
    s = s.to(tl.float64)
    n = num_samples                     # float32 scalar; promoted to float64 below
    idx = tl.arange(0, K)
    rows = idx[:, None]
    cols = idx[None, :]
    coef = tl.where(rows == cols, 1.0, 0.0).to(tl.float64)
    out = tl.zeros((K, K), dtype=tl.float64)
    diag0 = tl.abs(tl.reduce(tl.where(rows == cols, s, 0.0), 1, SUM))
    for i in range(count):
        srow = tl.reduce(tl.where(rows == i, s, 0.0), 0, SUM)             # s[i, :] = s[:, i]^T
        ci = tl.reduce(tl.where(cols == i, coef, 0.0), 1, SUM)            # coef[:, i]
        sii = tl.reduce(tl.where(idx == i, srow, 0.0), 0, SUM)
        scale = n + tl.reduce(tl.where(idx == i, diag0, 0.0), 0, SUM)
        rd = 1.0 / safe_pivot(n + sii, n, scale, tol)                     # float64: IEEE
        coef -= ci[:, None] * (srow[None, :] * rd)
        s -= srow[:, None] * (srow[None, :] * rd)
        out = tl.where(cols == i, ci[:, None] * tl.sqrt(rd), out)         # NaN when rd < 0
    return out.to(tl.float32)
