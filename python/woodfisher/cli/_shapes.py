"""One sample's shape for the CLI's FLOPs columns (``--input-shape``), checked before any work."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Tuple

import torch

from ..data import DATA_SHAPES
from ..flops import layer_flops


def input_shape(args: argparse.Namespace, spec, model: torch.nn.Module) -> Optional[Tuple[int, ...]]:
    """One sample's shape for the FLOPs columns: ``--input-shape``, else the built-in model's, else the built-in
    dataset's (``--data cifar10``) when the model runs on it, else None
    (:func:`flops_note` then says how to get them). A shape given is tried at once on one sample (before any
    pruning or training), so one the model cannot run is a ValueError naming ``--input-shape``, not a
    traceback after the work."""
    if args.input_shape is None:
        if spec is not None:
            return spec.input_shape
        shape = DATA_SHAPES.get(getattr(args, "data", None))  # your model on a built-in dataset: its samples' shape
        if shape is not None:
            try:
                layer_flops(model, shape)
            except Exception:  # noqa: BLE001 - the model takes another input: no FLOPs columns, the note says so
                return None
        return shape
    shape = tuple(args.input_shape)
    try:
        layer_flops(model, shape)
    except ValueError as err:
        raise ValueError(f"--input-shape: {err}") from None
    except (RuntimeError, IndexError, TypeError) as err:
        raise ValueError(f"--input-shape {' '.join(map(str, shape))}: the model cannot run a sample of that "
                         f"shape ({first_line(err)})") from None
    return shape


def flops_note(shape: Optional[Tuple[int, ...]]) -> None:
    """After the sparsity table: say how to get the FLOPs columns when no input shape was known."""
    if shape is None:
        print("note: no FLOPs columns in the sparsity table: pass --input-shape (one sample's shape, "
              "e.g. 3 32 32) to count them", file=sys.stderr)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (a model's shape error can run over many lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
