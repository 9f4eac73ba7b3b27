"""Deploy what was pruned: dense, ``torch.sparse`` CSR/BSR, 2:4 semi-structured and ONNX exports.

Every export takes the pruned model (weights with exact zeros, or held by
``torch.nn.utils.prune``) and optionally its masks ``{"<module>.weight": bool keep-mask}``,
works on a copy (the caller's model is never modified), and returns a model whose outputs
equal the dense pruned model's within the round-off of its dtype:

- :func:`to_dense`: a copy with the masks folded and exact zeros (today's ``pruned.pt`` format).
- :func:`to_sparse`: :class:`SparseLinear` (and, with ``conv=True``, :class:`SparseConv2d`) on
  ``torch.sparse`` CSR or BSR weights, for CPU inference at high sparsity (where it pays:
  ``benchmarks/results/inference_cpu.md``).
- :func:`to_semi_structured`: 2:4 ``SparseSemiStructuredTensor`` Linear weights in float16 /
  bfloat16, for NVIDIA GPUs of compute capability >= 8.0.
- :func:`to_onnx`: a ``.onnx`` file, dense with exact zeros (optional dependency ``[onnx]``).

:func:`load_sparse` rebuilds a CSR/BSR model from its saved state dict;
:func:`check_semi_structured` validates the 2:4 pattern without a GPU. The command line
``woodfisher export`` is :func:`add_export_arguments` + :func:`run_export`.
"""
from ._common import to_dense
from .cli import add_export_arguments, run_export
from .onnx_export import onnx_available, to_onnx
from .semi import check_device, check_semi_structured, pattern_violations, to_semi_structured
from .sparse import SparseConv2d, SparseLinear, load_sparse, to_sparse

__all__ = [
    "add_export_arguments", "check_device", "check_semi_structured", "load_sparse", "onnx_available",
    "pattern_violations", "run_export", "SparseConv2d", "SparseLinear", "to_dense", "to_onnx",
    "to_semi_structured", "to_sparse",
]
