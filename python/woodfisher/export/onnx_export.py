"""ONNX export of the pruned model, zeros kept (optional dependency: ``pip install .[onnx]``).

The model is exported dense, masks folded, with torch's ``torch.export``-based exporter
(``dynamo=True``, needs ``onnx`` and ``onnxscript``) into a single ``.onnx`` file. Every
pruned entry stays an exact zero in its initializer: ONNX has no sparse compute, so
the zeros are there for a runtime or compiler that exploits them (and for compression).
The exporter's graph optimisation may fold a BatchNorm into the preceding convolution;
that rescales rows of the weight but keeps every zero.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._common import Masks, to_dense

ONNX_HINT = "the ONNX export needs the onnx and onnxscript packages: pip install 'woodfisher_kernels[onnx]'"


def onnx_available() -> bool:
    """Whether :func:`to_onnx` can run here.

    Returns:
        True when ``onnx`` and ``onnxscript`` (the exporter's dependencies) are importable.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def to_onnx(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
            path: Union[str, os.PathLike], masks: Masks = None, *, dynamic_batch: bool = True,
            opset: Optional[int] = None) -> str:
    """Write the pruned ``model`` (masks folded, zeros kept) to ``path`` as ONNX.

    Args:
        model: the pruned model (never modified; a copy is exported in eval mode).
        example_inputs: one input tensor or a tuple of them, e.g. ``torch.randn(2, 3, 32, 32)``
            (used detached: a tensor that requires grad or holds a ``.grad`` is fine); the graph's
            input names are ``input`` (``input0, input1, ...`` for several).
        path: the ``.onnx`` file to write (weights inside the file, so below ONNX's 2 GB limit).
        masks: optional ``{"<module>.weight": bool keep-mask}`` folded in first.
        dynamic_batch: make dimension 0 of every input dynamic (default True).
        opset: ONNX opset version (default: the exporter's).
    Returns:
        ``path`` as a string. Written through a temporary file: on an error nothing is left at ``path``.
    Raises:
        ValueError naming ``example_inputs``, ``path`` or ``masks``; ImportError when onnx/onnxscript
        are missing.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    if not inputs or not all(isinstance(tensor, torch.Tensor) for tensor in inputs):
        raise ValueError("example_inputs must be a tensor or a non-empty sequence of tensors")
    inputs = tuple(tensor.detach() for tensor in inputs)  # a .grad or autograd history breaks torch.export's guards
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path: folder {folder!r} does not exist")
    exported = to_dense(model, masks).eval()
    if not onnx_available():
        raise ImportError(ONNX_HINT)
    names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs) if dynamic_batch else None
    handle, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(handle)
    try:
        with torch.no_grad():
            torch.onnx.export(exported, inputs, tmp, dynamo=True, external_data=False, verbose=False,
                              input_names=names, output_names=["output"], dynamic_shapes=dynamic,
                              opset_version=opset)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
