"""Pieces shared by the Triton kernels."""
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
