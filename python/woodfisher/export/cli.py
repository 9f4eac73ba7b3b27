"""``woodfisher export``: a pruned checkpoint (or dense weights + masks) -> a deployable file.

Formats (``--format``):

- ``dense``: state dict with exact zeros, masks folded (the ``pruned.pt`` format).
- ``csr`` / ``bsr``: state dict whose converted weights are ``torch.sparse`` CSR / BSR
  tensors; load it with ``woodfisher.export.load_sparse(factory(), path)``.
- ``2:4``: validates the 2:4 pattern and torch's tile, refuses a device without 2:4 sparse
  tensor cores, converts on the GPU and checks the outputs, then writes the dense weights in
  ``--dtype`` (compressed semi-structured tensors are built on the GPU at load time:
  ``to_semi_structured(model)``).
- ``onnx``: a single ``.onnx`` file (zeros kept), batch dimension dynamic.

Every format is checked before it is written when the input shape is known (a named
model's, or ``--input-shape``): its outputs on a random batch of 2 are compared with the
dense pruned model's (ONNX through onnxruntime when it is installed). For a factory model
without ``--input-shape`` the file is written unchecked, and the closing line says so and
how to check it.
csr / bsr / 2:4 print the layers they converted; a conversion that converts no layer is
refused (nothing sparse enough, or only convolutions, which need ``--conv``). Bad input
(including an ``--out`` that is a folder or whose folder does not exist, and an ``--input-shape``
the model cannot run) raises ValueError with a one-line
message and writes nothing.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..models import MODEL_SPECS

FORMATS = ("dense", "csr", "bsr", "2:4", "onnx")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``woodfisher export`` to ``parser`` (and ``func=run_export``).

    Args:
        parser: an ``argparse.ArgumentParser`` (the subcommand's).
    Returns:
        ``parser``.
    """
    parser.add_argument("--model", required=True,
                        help=f"architecture: a built-in one ({', '.join(sorted(MODEL_SPECS))}) or the import path "
                             "'package.module:factory' of a function that returns the nn.Module")
    parser.add_argument("--checkpoint", required=True,
                        help="pruned state dict (pruned.pt, exact zeros), or dense weights used with --masks")
    parser.add_argument("--masks", default=None,
                        help="masks.pt ({'<module>.weight': bool keep-mask}) to fold into --checkpoint (masks only "
                             "zero weights: for a WoodFisher result, whose OBS update moved the kept weights, "
                             "export its pruned.pt)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--out", required=True, help="output file (.pt, or .onnx for --format onnx)")
    parser.add_argument("--names", nargs="+", default=None,
                        help="layers to convert (default: csr/bsr every Linear with >= --min-sparsity zeros, "
                             "2:4 every Linear holding zeros)")
    parser.add_argument("--min-sparsity", type=float, default=0.7,
                        help="csr/bsr: layers with a smaller fraction of zeros stay dense")
    parser.add_argument("--conv", action="store_true", help="csr/bsr: also convert Conv2d (im2col; slower on CPU)")
    parser.add_argument("--blocksize", type=int, default=None, help="bsr: square block size (default 4)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="2:4: weight dtype on the GPU")
    parser.add_argument("--device", default="cuda", help="2:4: the GPU to convert on")
    parser.add_argument("--input-shape", type=int, nargs="+", default=None,
                        help="one sample's shape, e.g. 3 32 32 (default: the named model's)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of a checkpoint that weights_only loading refuses")
    parser.set_defaults(func=run_export)
    return parser


def _factory(spec: str) -> Tuple[Callable[[], nn.Module], Optional[Tuple[int, ...]]]:
    """A built-in model or, as for ``woodfisher prune``, ``package.module:factory`` / ``file.py:factory``
    (the current directory importable; the reason named when it cannot be loaded)."""
    from ..cli._common import is_import_path, load_object  # late: woodfisher.cli imports this module

    if spec in MODEL_SPECS:
        return MODEL_SPECS[spec].factory, MODEL_SPECS[spec].input_shape
    if not is_import_path(spec):
        raise ValueError(f"--model must be one of {sorted(MODEL_SPECS)} or 'package.module:factory' / "
                         f"'file.py:factory', got {spec!r}")
    factory = load_object(spec, "--model")
    if not callable(factory):
        raise ValueError(f"--model {spec!r} is a {type(factory).__name__}, not a function returning the nn.Module")
    return factory, None


def _load_masks(path: Optional[str]):
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"masks file not found: {path!r}")
    masks = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(masks, dict) or not all(isinstance(value, torch.Tensor) for value in masks.values()):
        raise ValueError(f"--masks {path!r} holds no {{'<module>.weight': bool tensor}} dict")
    return masks


def _max_diff(got, ref) -> float:
    """Largest ``|got - ref|`` over the tensors of two outputs: tensors, tuples or dicts (HF-style outputs)."""
    pairs = zip(*(([x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]) for out in (got, ref)))
    return max((float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max()) for a, b in pairs),
               default=0.0)


def run_export(args: argparse.Namespace) -> int:
    """Run ``woodfisher export`` (see the module docstring).

    Args:
        args: the namespace :func:`add_export_arguments` parses (model, checkpoint, masks, format,
            out, names, min_sparsity, conv, blocksize, dtype, device, input_shape, trust_pickle).
    Returns:
        0 (the exit status).
    Raises:
        ValueError: bad input: ``--blocksize`` without bsr, onnx without its dependencies or
            without an input shape, an ``--out`` that is a folder or whose folder does not exist, an
            ``--input-shape`` the model cannot run, an unreadable
            checkpoint or masks, no layer to convert, and every error of the export called.
    """
    from ..checkpoint import load_checkpoint, save_state_dict
    from ._common import to_dense
    from .onnx_export import ONNX_HINT, onnx_available, to_onnx
    from .semi import to_semi_structured
    from .sparse import load_sparse, to_sparse

    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a folder; give the file to write, "
                         f"e.g. {os.path.join(args.out, 'model.pt')!r}")
    factory, shape = _factory(args.model)
    shape = tuple(args.input_shape) if args.input_shape else shape
    if args.blocksize is not None and args.format != "bsr":
        raise ValueError("--blocksize applies to --format bsr only")
    if args.conv and args.format not in ("csr", "bsr"):
        raise ValueError("--conv applies to --format csr / bsr only" + (
            " (2:4 semi-structured weights are nn.Linear ones: torch's SparseSemiStructuredTensor serves F.linear; "
            "2:4-pruned convolutions stay dense with exact zeros)" if args.format == "2:4" else ""))
    if args.format == "onnx" and not onnx_available():
        raise ValueError(ONNX_HINT)
    model = load_checkpoint(factory(), args.checkpoint, trust_pickle=args.trust_pickle).eval()
    masks = _load_masks(args.masks)
    dense = to_dense(model, masks)
    sample = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)) if shape else None
    if args.format == "onnx" and sample is None:
        raise ValueError("--format onnx needs --input-shape for a model that is not in MODEL_SPECS")
    with torch.no_grad():
        ref = _reference(dense, sample, args.input_shape)
        if args.format == "dense":
            exported, diff = dense, 0.0
        elif args.format in ("csr", "bsr"):
            exported = to_sparse(dense, layout=args.format, blocksize=args.blocksize, names=args.names,
                                 min_sparsity=args.min_sparsity, conv=args.conv)
            diff = _max_diff(exported(sample), ref) if sample is not None else None
        elif args.format == "2:4":
            dtype = DTYPES[args.dtype]
            gpu = to_semi_structured(dense, names=args.names, dtype=dtype, device=args.device)
            device = next(gpu.parameters()).device
            half = to_dense(dense).to(device=device, dtype=dtype)
            diff = _max_diff(gpu(sample.to(device, dtype)), half(sample.to(device, dtype))) if shape else None
            exported = to_dense(dense).to(dtype)
    converted = _converted(exported if args.format != "2:4" else gpu, dense, args) if args.format in (
        "csr", "bsr", "2:4") else None
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):  # as to_onnx: the folder is not created
        raise ValueError(f"--out {args.out!r}: folder {folder!r} does not exist")
    if converted:
        print(converted)
    if args.format == "onnx":
        to_onnx(dense, sample, args.out)
        diff = _onnx_diff(args.out, sample, ref)
    else:
        save_state_dict(exported, args.out)
        if args.format in ("csr", "bsr"):
            load_sparse(factory(), args.out)              # the file loads back
    note = (f"max |output - dense output| = {diff:.3g} on a random batch of 2" if diff is not None else
            "outputs not compared with the dense model: no example input; for a model of float inputs, "
            "--input-shape (one sample's shape) gives one")
    print(f"wrote {args.out} (format {args.format}; {note})")
    return 0


def _reference(dense: nn.Module, sample: Optional[torch.Tensor], input_shape) -> Optional[torch.Tensor]:
    """The dense model's output on ``sample`` (None without one); a model that cannot take a batch of the
    ``--input-shape`` given is a ValueError naming it, not the model's own traceback."""
    from ..cli._shapes import first_line  # late: woodfisher.cli imports this module

    if sample is None:
        return None
    try:
        return dense(sample)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        if input_shape is None:
            raise
        raise ValueError(f"--input-shape {' '.join(map(str, input_shape))}: the model cannot run a batch "
                         f"of shape {tuple(sample.shape)} ({first_line(err)})") from None


def _zeros(module: nn.Module) -> float:
    """Fraction of zeros of a layer's weight (of all the matrices of a recurrent layer)."""
    mats = [p for n, p in module.named_parameters(recurse=False) if n.startswith("weight")]
    total = sum(p.numel() for p in mats)
    return sum(int((p == 0).sum()) for p in mats) / max(total, 1)


def _converted(exported: nn.Module, dense: nn.Module, args: argparse.Namespace) -> str:
    """``"converted to csr: fc1 (91.2% zeros), ..."``; ValueError saying why when no layer was converted."""
    from ..targets import is_hf_conv1d
    from ._common import attention_children, dense_attention, sparsity
    from .sparse import SparseConv2d, SparseLinear

    semi = getattr(torch.sparse, "SparseSemiStructuredTensor", ())
    modules = dict(dense.named_modules())
    names = [name for name, module in exported.named_modules() if isinstance(module, (SparseLinear, SparseConv2d))
             or isinstance(getattr(module, "weight", None), semi)]
    # Conv1d / Conv3d / transposed convolutions and recurrent layers have no sparse module: named, not left dense
    # silently
    zeros = {name: _zeros(m) for name, m in modules.items() if type(m) is not nn.Conv2d
             and isinstance(m, (nn.modules.conv._ConvNd, nn.RNNBase))}
    others = [f"{name} ({type(modules[name]).__name__}, {100 * value:.1f}% zeros)" for name, value in zeros.items()
              if value >= args.min_sparsity]
    no_module = (f"; left dense (--format {args.format} converts Linear" + (" and Conv2d" if args.conv else "")
                 + " layers only): " + ", ".join(others)) if others and args.format != "2:4" else ""
    attention = dense_attention(dense, args.min_sparsity if args.format != "2:4" else 0.0)
    left = (f"; left dense (nn.MultiheadAttention reads its weights directly): {', '.join(attention)}"
            if attention else "")
    if names:
        return f"converted to {args.format}: " + ", ".join(
            f"{name} ({100 * sparsity(modules[name].weight):.1f}% zeros)" for name in names) + left + no_module
    inside = attention_children(dense)   # never converted: not counted as candidates either
    linears = [(sparsity(m.weight), name) for name, m in modules.items() if name not in inside and (
               isinstance(m, nn.Linear) or (args.format != "2:4" and is_hf_conv1d(m)))]
    convs = [(sparsity(m.weight), name) for name, m in modules.items() if isinstance(m, nn.Conv2d)]
    kinds = linears + (convs if args.conv else [])
    why = [f"no {'Linear or Conv2d' if args.conv else 'Linear'} layer has >= {args.min_sparsity:g} zeros "
           f"(--min-sparsity; the sparsest: {max(kinds)[1]}, {100 * max(kinds)[0]:.1f}%)" if kinds else
           f"the model has no {'Linear or Conv2d' if args.conv else 'Linear'} layer"]
    if attention:
        why.append(f"nn.MultiheadAttention weights stay dense (read directly by attention): {', '.join(attention)}")
    sparse_convs = [name for value, name in convs if value >= args.min_sparsity]
    if convs and not args.conv:
        why.append(f"its {len(convs)} Conv2d layers ({len(sparse_convs)} sparse enough) are converted only with "
                   "--conv (im2col; slower than dense on CPU)")
    raise ValueError(f"--format {args.format} converted no layer, nothing written: " + "; ".join(why) + no_module)


def _onnx_diff(path: str, sample: torch.Tensor, ref) -> Optional[float]:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    return _max_diff([torch.from_numpy(x) for x in got], ref)
