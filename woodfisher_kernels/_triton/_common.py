"""Pieces shared by the Triton kernels: the reduction combiner, IEEE division / square root,
and the pivot rule of the Woodbury kernels."""
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


@triton.jit
def safe_pivot(d, n, scale, tol):
    """Pivot ``d = N + g^T F' g`` of a Sherman-Morrison step (``>= N`` for a positive
    definite F). A value below N by at most ``tol * scale`` (the rounding bound) is floored
    at N; a larger violation means F has lost definiteness in float32 and gives -1, whose
    square root is NaN: the block becomes NaN instead of silently wrong."""
    return tl.where(d >= n, d, tl.where(d >= n - tol * scale, n, -1.0))
