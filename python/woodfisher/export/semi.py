"""2:4 semi-structured weights (``torch.sparse.to_sparse_semi_structured``) for NVIDIA GPUs.

A model pruned with ``pattern="2:4"`` keeps at most 2 non-zeros in every run of 4
consecutive weights of a row, which is what the sparse tensor cores of compute
capability 8.0+ (A100, H100, ...) accelerate. torch stores such a weight compressed
(half the values + metadata) and ``F.linear`` dispatches to cuSPARSELt (or CUTLASS).

What is supported: ``nn.Linear`` weights ``(out, in)`` in float16 or bfloat16 (float32
semi-structured needs the 1:2 pattern, which a 2:4 mask does not give), with ``out`` and
``in`` multiples of torch's minimum tile for the backend and dtype (16 x 16 for cuSPARSELt
half precision, 32 x 64 for CUTLASS). Everything is validated on the CPU copy before
any conversion (:func:`check_semi_structured`); the device is checked next, so a CPU-only
machine can still check that a model is ready for a GPU.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..structured import parse_pattern
from ..targets import is_hf_conv1d
from ._common import Masks, select_layers, sparsity, swap, to_dense, unwrapped_names, warn_dense_attention

DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


def _backend():
    """The class ``to_sparse_semi_structured`` will build here (cuSPARSELt unless CUTLASS is forced/only)."""
    sparse = torch.sparse
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if sparse.SparseSemiStructuredTensor._FORCE_CUTLASS or (cusparselt is not None and not cusparselt.is_available()):
        return sparse.SparseSemiStructuredTensorCUTLASS
    return sparse.SparseSemiStructuredTensorCUSPARSELT


def min_tile(dtype: torch.dtype) -> Tuple[int, int]:
    """(rows, cols) that a semi-structured weight's shape must be a multiple of, for this torch and dtype."""
    constraints = getattr(_backend(), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if constraints is None:
        return (32, 64)                         # the strictest tile of either backend (CUTLASS, 16-bit)
    return (constraints.sparse_min_rows, constraints.sparse_min_cols)


def pattern_violations(weight: torch.Tensor, n=2, m: int = 4) -> int:
    """Count the runs of ``m`` consecutive input features / channels with more than ``n`` non-zeros (N:M check).

    A Linear weight's runs go along ``in`` in each row; a conv weight's along the input channels at each (out,
    kernel position), the order of 2:4 sparse tensor cores (a conv as an implicit GEMM with K = (*kernel, in)).

    Args:
        weight: (out, in) or conv (out, in / groups, *kernel) tensor, ``in`` (per group) a multiple of ``m``
            (a HuggingFace ``Conv1D`` stores (in, out): pass ``weight.T``).
        n, m: the N:M pattern (default 2:4), integers with 0 < n < m; or ``n`` the pattern string
            (``pattern_violations(w, "2:4")``, as ``pattern=`` of the pruning calls).
    Returns:
        The number of violating runs (0: the weight fits N:M).
    Raises:
        ValueError: naming ``weight`` (not a tensor of >= 2 dims, or ``in`` per group not a multiple of ``m``: its
            runs do not exist) or ``n`` / ``m`` (not integers with 0 < n < m, or not an "N:M" string).
    """
    n, m = _pattern_nm(n, m)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(f"weight must be an (out, in) or conv (out, in / groups, *kernel) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.shape[1] % m:
        what = "input channels per group" if weight.dim() > 2 else "entries per row"
        raise ValueError(f"weight of shape {tuple(weight.shape)} has {weight.shape[1]} {what}, not a multiple of "
                         f"{m}: its {n}:{m} runs do not exist (a pruning call leaves such weights dense)")
    nonzero = (weight.detach() != 0).movedim(1, -1)
    runs = nonzero.reshape(weight.shape[0], -1, m)
    return int((runs.sum(-1) > n).sum())


def _pattern_nm(n, m) -> Tuple[int, int]:
    """(n, m) from ``pattern_violations``'s arguments: two integers, or an "N:M" string as ``n``."""
    if isinstance(n, str):
        parsed = parse_pattern(n) if ":" in n else None
        if parsed is None:
            raise ValueError(f"n must be an integer or an 'N:M' pattern string such as '2:4', got {n!r}")
        return parsed[1], parsed[2]
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, m)) or not 0 < n < m:
        raise ValueError(f"n and m must be integers with 0 < n < m (the N:M pattern), got n={n!r}, m={m!r}")
    return int(n), int(m)


def check_semi_structured(model: nn.Module, masks: Masks = None, *, names: Optional[Sequence[str]] = None,
                          dtype: torch.dtype = torch.float16) -> List[str]:
    """Check, without converting, that the layers can become 2:4 semi-structured weights.

    Args:
        model, masks: as :func:`woodfisher.export.to_dense` (the model is not modified).
        names: ``nn.Linear`` modules to convert; default every Linear (outside
            ``nn.MultiheadAttention``) that holds exact zeros: each must then fit the pattern.
        dtype: torch.float16 or torch.bfloat16 (the weights' dtype on the GPU).
    Returns:
        the names of the layers :func:`to_semi_structured` would convert.
    Raises:
        ValueError naming ``dtype``, ``names`` or the layers that break the 2:4 pattern
        (with the count of runs of 4 holding more than 2 non-zeros) or torch's minimum tile.
    """
    _check_dtype(dtype)
    return [name for name, _ in _validated(to_dense(model, masks), unwrapped_names(model, names), dtype)]


def _check_dtype(dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 for 2:4 semi-structured weights "
                         f"(float32 sparse tensor cores need a 1:2 pattern), got {dtype!r}")


def _validated(model: nn.Module, names, dtype) -> List[Tuple[str, nn.Linear]]:
    layers = select_layers(model, names, (nn.Linear,), 0.0)
    if names is None:
        layers = [(name, module) for name, module in layers if sparsity(module.weight) > 0]
        warn_dense_attention(model, 0.0, "2:4 semi-structured")
    if not layers:
        conv1d = [name for name, module in model.named_modules() if is_hf_conv1d(module)]
        hint = (f"; HuggingFace Conv1D layers ({conv1d[0]!r}, ...) are not converted to 2:4 (to_sparse converts "
                f"them to CSR / BSR)" if conv1d else "")
        raise ValueError("names: no nn.Linear layer with exact zeros to convert to 2:4 "
                         f"(pass names=[...]; CLI: --names){hint}")
    tile_rows, tile_cols = min_tile(dtype)
    problems = []
    for name, module in layers:
        rows, cols = module.weight.shape
        bad = pattern_violations(module.weight) if cols % 4 == 0 else 0
        if cols % 4:
            problems.append(f"{name!r}: in_features {cols} is not a multiple of 4")
        elif bad:
            problems.append(f"{name!r}: {bad} of {rows * cols // 4} runs of 4 "
                            f"weights hold more than 2 non-zeros (prune with pattern='2:4')")
        elif rows % tile_rows or cols % tile_cols:
            problems.append(f"{name!r}: weight {rows} x {cols} is not a multiple of torch's minimum "
                            f"{tile_rows} x {tile_cols} tile ({_backend().BACKEND} backend, {dtype})")
    if problems:
        raise ValueError("not 2:4 semi-structured: " + "; ".join(problems)
                         + " (pass names=[...], CLI: --names, to convert only the others)")
    return layers


def check_device(device) -> torch.device:
    """The CUDA device, if it has 2:4 sparse tensor cores (compute capability >= 8.0).

    Args:
        device: a ``torch.device`` or its name, e.g. "cuda" or "cuda:1".
    Returns:
        The ``torch.device``.
    Raises:
        ValueError: not a device, not CUDA, CUDA not available here, or a compute capability
            below 8.0 (naming ``device``).
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cuda', got {device!r}") from None
    if device.type != "cuda":
        raise ValueError(f"device: 2:4 semi-structured weights need an NVIDIA GPU of compute capability "
                         f">= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (device='cuda'), got device={str(device)!r}")
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise ValueError("device: 2:4 semi-structured weights need an NVIDIA GPU, and torch.cuda is not "
                         "available here")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(f"device: {torch.cuda.get_device_name(device)} has compute capability "
                         f"{capability[0]}.{capability[1]}; 2:4 semi-structured weights need >= "
                         f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
    return device


def to_semi_structured(model: nn.Module, masks: Masks = None, *, names: Optional[Sequence[str]] = None,
                       dtype: torch.dtype = torch.float16, device="cuda") -> nn.Module:
    """A copy of the 2:4-pruned ``model`` on ``device`` in ``dtype`` with semi-structured Linear weights.

    The pattern and shapes are validated first (:func:`check_semi_structured`), then the device
    (:func:`check_device`); only then is anything converted.

    Args:
        model, masks, names, dtype: as :func:`check_semi_structured`; the model is not modified.
        device: a CUDA device of compute capability >= 8.0.
    Returns:
        a new model, cast to ``dtype`` and moved to ``device`` as a whole (inputs must be given in
        ``dtype`` on ``device``); each converted ``nn.Linear`` keeps its name and holds a
        ``SparseSemiStructuredTensor`` weight (``(out, in)``, inference only). Its outputs equal
        the dense pruned model's in ``dtype`` up to half-precision round-off.
    Raises:
        ValueError as :func:`check_semi_structured`, or naming ``device`` (not CUDA, no GPU,
        compute capability < 8.0).
    """
    _check_dtype(dtype)
    out = to_dense(model, masks)
    layers = _validated(out, unwrapped_names(model, names), dtype)
    device = check_device(device)
    out = out.to(device=device, dtype=dtype)
    backend = _backend()
    for name, module in layers:
        weight = module.weight.detach().contiguous()
        if backend is torch.sparse.SparseSemiStructuredTensorCUSPARSELT:
            packed = torch.sparse.to_sparse_semi_structured(weight)
        else:
            packed = backend.from_dense(weight)
        module.weight = nn.Parameter(packed, requires_grad=False)
        swap(out, name, module)
    return out
