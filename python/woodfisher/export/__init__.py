"""Deploy what was pruned: dense, ``torch.sparse`` CSR/BSR, 2:4 semi-structured and ONNX exports.

Every export takes the pruned model (weights with exact zeros, or held by
``torch.nn.utils.prune``) and optionally its masks ``{"<module>.weight": bool keep-mask}``,
works on a copy (the caller's model is never modified), and returns a model whose outputs
equal the dense pruned model's within the round-off of its dtype:

=====================  ==========================================  ==============================
function               result                                      where it pays
=====================  ==========================================  ==============================
:func:`to_dense`       copy with masks folded, exact zeros          (today's ``pruned.pt`` format)
:func:`to_sparse`      :class:`SparseLinear` (and, with             CPU, high sparsity; see
                       ``conv=True``, :class:`SparseConv2d`) on      ``benchmarks/results/
                       CSR or BSR weights                           inference_cpu.md``
:func:`to_semi_structured`  2:4 ``SparseSemiStructuredTensor``      NVIDIA GPU, capability >= 8.0,
                       Linear weights, fp16/bf16                    float16/bfloat16
:func:`to_onnx`        ``.onnx`` file, dense with exact zeros       runtimes that exploit zeros
=====================  ==========================================  ==============================

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
