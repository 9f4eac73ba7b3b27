"""``torch.sparse`` CSR / BSR weights and the modules that compute with them (CPU inference).

- :class:`SparseLinear`: weight ``(out, in)`` in CSR or BSR, optional dense bias ``(out,)``;
  input ``(..., in)`` -> ``(..., out)``. One row: ``addmv(bias, W, x)``; more rows:
  ``addmm(bias, W, x^T)^T`` (torch's sparse-times-dense, MKL on the CPU wheels).
- :class:`SparseConv2d`: weight flattened to ``(out, in * kh * kw)`` in CSR or BSR; input
  ``(N, in, H, W)`` -> ``(N, out, H', W')`` by im2col (``F.unfold``) and the same product.
  Only ``groups=1`` and zero padding given as numbers. It runs and is exact, but on the CPUs
  measured here it never pays (the ``unfold`` alone costs more than the dense convolution,
  see ``benchmarks/results/inference_cpu.md``), so :func:`to_sparse` swaps convolutions only
  when asked (``conv=True``).

The sparse weights are buffers named ``weight`` (and ``bias``), so a swapped model's
``state_dict()`` keeps the architecture's keys (``fc1.weight`` is a CSR tensor of the
dense shape; a conv weight is 2-D). :func:`load_sparse` rebuilds the swapped model from
such a state dict. Inference only: no gradient reaches the sparse weights. Both modules
support ``copy.deepcopy``, ``torch.jit.trace`` and ``torch.export.export``; ``torch.jit.script``
is not supported.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import is_int
from ..targets import is_hf_conv1d
from ._common import Masks, select_layers, swap, to_dense, unwrapped_names, warn_dense_attention

LAYOUTS = {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}
DEFAULT_BLOCKSIZE = 4


def _sparse_weight(weight: torch.Tensor, layout: str, blocksize: Optional[int], name: str) -> torch.Tensor:
    """2-D dense ``weight`` -> CSR, or BSR with square ``blocksize`` blocks (MKL needs square ones)."""
    if weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"layer {name!r}: sparse CPU weights must be float32 or float64, got {weight.dtype}")
    weight = weight.detach()
    rows, cols = weight.shape
    if layout == "bsr" and (rows % blocksize or cols % blocksize):
        raise ValueError(f"blocksize {blocksize} must divide both dimensions of layer {name!r} "
                         f"(weight as a matrix: {rows} x {cols})")
    with warnings.catch_warnings():            # torch's "sparse CSR/BSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        if layout == "csr":
            return weight.to_sparse_csr()
        return weight.to_sparse_bsr((blocksize, blocksize))


def _register_weights(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      shape: Tuple[int, int]) -> None:
    """Check and keep ``weight`` (sparse CSR/BSR of ``shape``) and ``bias`` (``(shape[0],)`` or None) as buffers."""
    if weight.layout not in LAYOUTS.values() or tuple(weight.shape) != shape:
        raise ValueError(f"weight must be a sparse CSR/BSR tensor of shape {shape}, got "
                         f"{weight.layout} {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != shape[:1]:
        raise ValueError(f"bias must have shape ({shape[0]},), got {tuple(bias.shape)}")
    module.register_buffer("weight", weight)
    module.register_buffer("bias", None if bias is None else bias.detach().clone())


def _sparse_mm(weight: torch.Tensor, bias: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``rows @ weight^T + bias`` for a sparse ``weight`` (out, k) and dense ``rows`` (n, k) -> (n, out).

    One row: a sparse matrix-vector product (``F.linear`` with a sparse weight fails under
    ``torch.inference_mode``); several: ``addmm(bias, W, rows^T)^T``.
    """
    if rows.shape[0] == 1:
        product = torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])
        return product.unsqueeze(0)
    if bias is None:
        return torch.mm(weight, rows.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, rows.t()).t()


class _SparseModule(nn.Module):
    """What both sparse modules share: ``copy.deepcopy`` (torch cannot deep-copy a CSR / BSR tensor,
    so the sparse buffers are cloned first; the copy owns its storage)."""

    def __deepcopy__(self, memo):
        for value in self._buffers.values():
            if value is not None and value.layout in LAYOUTS.values() and id(value) not in memo:
                memo[id(value)] = value.clone()
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin


class SparseLinear(_SparseModule):
    """``nn.Linear`` with a sparse weight: ``(..., in_features) -> (..., out_features)``.

    Args:
        weight: sparse CSR or BSR tensor ``(out_features, in_features)``, float32 or float64.
        bias: dense ``(out_features,)`` or None.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[-1])
        _register_weights(self, weight, bias, (self.out_features, self.in_features))

    @classmethod
    def from_dense(cls, linear: nn.Module, layout: str = "csr", blocksize: Optional[int] = None,
                   name: str = "linear") -> "SparseLinear":
        """The sparse twin of ``linear`` (its exact zeros are not stored).

        Args:
            linear: an ``nn.Linear`` with float32 or float64 weights (out, in), or a HuggingFace
                ``Conv1D`` (GPT-2; weight (in, out), stored transposed as the (out, in) sparse weight).
            layout: "csr" or "bsr". blocksize: BSR square block size (default 4; must divide out and in).
            name: the layer's name, for error messages.
        Returns:
            :class:`SparseLinear` on the device of ``linear``.
        Raises:
            ValueError: a weight dtype other than float32/float64, or a ``blocksize`` that does not
                divide both dimensions (naming the layer).
        """
        weight = linear.weight.t().contiguous() if is_hf_conv1d(linear) else linear.weight
        return cls(_sparse_weight(weight, layout, blocksize or DEFAULT_BLOCKSIZE, name), linear.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ weight^T + bias`` with the sparse weight.

        Args:
            inputs: (..., in_features), the weight's dtype and device.
        Returns:
            (..., out_features).
        """
        product = _sparse_mm(self.weight, self.bias, inputs.reshape(-1, self.in_features))
        return product.reshape(*inputs.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """The module's repr line.

        Returns:
            Sizes, layout, number of stored entries (nnz) and whether there is a bias.
        """
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"layout={self.weight.layout}, nnz={self.weight.values().numel()}, bias={self.bias is not None}")


class SparseConv2d(_SparseModule):
    """``nn.Conv2d`` (groups=1, zero padding) with a sparse weight, computed as im2col + sparse GEMM.

    Args:
        weight: sparse CSR or BSR ``(out_channels, in_channels * kh * kw)``.
        bias: dense ``(out_channels,)`` or None.
        in_channels, kernel_size, stride, padding, dilation: as the ``nn.Conv2d`` (pairs of ints).
    Input ``(N, in, H, W)`` or ``(in, H, W)``; output ``(N, out, H', W')`` with
    ``H' = (H + 2 p - d (kh - 1) - 1) // s + 1`` (likewise W').
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], in_channels: int,
                 kernel_size: Tuple[int, int], stride: Tuple[int, int] = (1, 1), padding: Tuple[int, int] = (0, 0),
                 dilation: Tuple[int, int] = (1, 1)):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(weight.shape[0])
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        cols = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        _register_weights(self, weight, bias, (self.out_channels, cols))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, layout: str = "csr", blocksize: Optional[int] = None,
                   name: str = "conv") -> "SparseConv2d":
        """The sparse twin of ``conv`` (its exact zeros are not stored).

        Args:
            conv: an ``nn.Conv2d`` with groups=1, numeric zero padding, float32 or float64 weights.
            layout: "csr" or "bsr". blocksize: BSR square block size (default 4; must divide
                out_channels and in_channels * kh * kw).
            name: the layer's name, for error messages.
        Returns:
            :class:`SparseConv2d` on the device of ``conv``.
        Raises:
            ValueError: groups > 1, non-numeric or non-zero padding mode, a weight dtype other than
                float32/float64, or a ``blocksize`` that does not divide the weight matrix (naming ``name``).
        """
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"layer {name!r}: sparse convolution supports groups=1 and numeric zero padding "
                             f"only (got groups={conv.groups}, padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r})")
        weight = _sparse_weight(conv.weight.flatten(1), layout, blocksize or DEFAULT_BLOCKSIZE, name)
        return cls(weight, conv.bias, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The convolution as im2col + one sparse GEMM.

        Args:
            inputs: (N, in_channels, H, W) or (in_channels, H, W), the weight's dtype and device.
        Returns:
            (N, out_channels, H', W') (or without N), H' and W' as in the class docstring.
        """
        if inputs.dim() == 3:
            return self.forward(inputs.unsqueeze(0)).squeeze(0)
        batch, _, height, width = inputs.shape
        out_h, out_w = (
            (size + 2 * pad - dil * (kernel - 1) - 1) // step + 1
            for size, pad, dil, kernel, step in zip((height, width), self.padding, self.dilation, self.kernel_size,
                                                    self.stride))
        cols = F.unfold(inputs, self.kernel_size, self.dilation, self.padding, self.stride)   # (N, K, L)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)                                # (K, N L)
        if self.bias is None:
            product = torch.mm(self.weight, cols)                                             # (out, N L)
        else:
            product = torch.addmm(self.bias.unsqueeze(1), self.weight, cols)
        return product.view(self.out_channels, batch, out_h, out_w).transpose(0, 1)

    def extra_repr(self) -> str:
        """The module's repr line.

        Returns:
            Channels, kernel size, stride, padding, dilation, layout and number of stored entries (nnz).
        """
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, layout={self.weight.layout}, "
                f"nnz={self.weight.values().numel()}")


def _check_layout(layout: str, blocksize: Optional[int]) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if blocksize is not None:
        if layout != "bsr":
            raise ValueError(f"blocksize applies to layout='bsr' only, got blocksize={blocksize!r}")
        if not is_int(blocksize) or blocksize < 1:
            raise ValueError(f"blocksize must be an int >= 1 (square blocks), got {blocksize!r}")


def to_sparse(model: nn.Module, masks: Masks = None, *, layout: str = "csr", blocksize: Optional[int] = None,
              names: Optional[Sequence[str]] = None, min_sparsity: float = 0.7, conv: bool = False) -> nn.Module:
    """A copy of the pruned ``model`` whose sparse layers compute with ``torch.sparse`` weights.

    Args:
        model: pruned model (float32 or float64 weights with exact zeros, or held by
            ``torch.nn.utils.prune``); never modified.
        masks: optional ``{"<module>.weight": bool keep-mask}`` folded in first (see :func:`to_dense`).
        layout: ``"csr"`` (every non-zero stored) or ``"bsr"`` (square ``blocksize`` blocks that hold
            a non-zero are stored whole; default 4 x 4; both weight dimensions must be multiples).
        names: modules (or ``"<module>.weight"``) to convert; default every ``nn.Linear`` and
            HuggingFace ``Conv1D`` (GPT-2; and ``nn.Conv2d`` with ``conv=True``) whose weight has at
            least ``min_sparsity`` zeros
            (for ``"bsr"``, and whose dimensions the blocks divide: a 10-class head stays dense).
            ``nn.MultiheadAttention`` weights stay dense (attention reads them directly), with one warning naming
            the modules whose weights have at least ``min_sparsity`` zeros.
        min_sparsity: fraction of zeros in [0, 1] below which a layer stays dense when ``names``
            is None (default 0.7: at 50% CSR was slower than dense in every configuration of
            ``benchmarks/results/inference_cpu.md``; from 70% on some configurations pay).
        conv: also convert ``nn.Conv2d`` (im2col + sparse GEMM; correct but slower than dense on CPU).
    Returns:
        a new model: :class:`SparseLinear` / :class:`SparseConv2d` in place of the converted layers,
        outputs equal to :func:`to_dense` ``(model, masks)`` up to float round-off of the summation order.
    Raises:
        ValueError naming the argument: bad layout/blocksize/masks/names/min_sparsity, a blocksize
        that does not divide a layer named in ``names``, a dtype other than float32/float64, an unsupported conv.
    """
    _check_layout(layout, blocksize)
    out = to_dense(model, masks)
    types = (nn.Linear, nn.Conv2d) if conv else (nn.Linear,)
    layers = select_layers(out, unwrapped_names(model, names), types, min_sparsity, conv1d=True)
    if layout == "bsr" and names is None:  # chosen by default: skip the layers the blocks cannot tile
        size = blocksize or DEFAULT_BLOCKSIZE
        layers = [(name, module) for name, module in layers
                  if not (module.weight.shape[0] % size or module.weight[0].numel() % size)]
    swapped = {name: (SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear).from_dense(
        module, layout, blocksize, name) for name, module in layers}
    for name, module in swapped.items():
        swap(out, name, module)
    if names is None:
        warn_dense_attention(out, min_sparsity, "to_sparse")
    return out


def load_sparse(model: nn.Module, state: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> nn.Module:
    """Rebuild a :func:`to_sparse` model from its ``state_dict()`` (or a file saved with ``torch.save``).

    Args:
        model: the dense architecture (e.g. a fresh model from its factory); never modified.
        state: ``{key: tensor}`` where CSR/BSR tensors at ``"<module>.weight"`` mark swapped layers,
            or the path of such a file (read with ``weights_only=True``).
    Returns:
        a new model with :class:`SparseLinear` / :class:`SparseConv2d` at the sparse keys and every
        other tensor loaded strictly.
    Raises:
        ValueError for a sparse key that is no Linear/Conv2d weight, wrong shapes, or missing /
        unexpected keys; FileNotFoundError for a missing file.
    """
    if isinstance(state, (str, os.PathLike)):
        from ..checkpoint import read_state_dict
        state = read_state_dict(state)
    out = to_dense(model)
    modules = dict(out.named_modules())
    sparse_keys = [key for key, value in state.items() if value.layout in LAYOUTS.values()]
    swapped: Dict[str, nn.Module] = {}
    for key in sparse_keys:
        name = key[: -len(".weight")]
        module = modules.get(name) if key.endswith(".weight") else None
        bias = state.get(f"{name}.bias")
        if type(module) is nn.Linear or is_hf_conv1d(module):
            swapped[name] = SparseLinear(state[key], bias)
        elif type(module) is nn.Conv2d:
            swapped[name] = SparseConv2d(state[key], bias, module.in_channels, module.kernel_size,
                                         module.stride, module.padding, module.dilation)
        else:
            raise ValueError(f"state: sparse tensor {key!r} is not the weight of an nn.Linear, Conv1D or nn.Conv2d")
    dense = {key: value for key, value in state.items() if key.rsplit(".", 1)[0] not in swapped}
    for name, module in swapped.items():
        swap(out, name, module)
    missing, unexpected = out.load_state_dict(dense, strict=False)
    missing = [key for key in missing if key.rsplit(".", 1)[0] not in swapped]
    if missing or unexpected:
        raise ValueError(f"state does not match {type(model).__name__}: missing keys {missing[:6]}, "
                         f"unexpected keys {unexpected[:6]}")
    return out
