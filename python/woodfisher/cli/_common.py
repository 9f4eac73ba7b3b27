"""Helpers shared by the subcommands: argument types, model and data loading, output files."""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Union

import torch

from ..models import MODEL_SPECS


def sparsity_type(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must lie in [0, 1) (a fraction, e.g. 0.9), got {text}")
    return value


def _auto_or_positive(convert, what: str):
    """An argparse type: the string "auto", or ``convert(text)`` > 0."""
    def parse(text: str):
        if text == "auto":
            return "auto"
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number > 0 or 'auto', got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {text!r}")
        return value
    parse.__name__ = what.replace(" ", "_")
    return parse


damp_type = _auto_or_positive(float, "damp")
steps_type = _auto_or_positive(int, "num steps")


def block_size_type(text: str) -> Optional[Union[int, str]]:
    if text.lower() in ("layer", "none", "whole"):
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"block size must be a positive int, 'auto' or 'layer', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"block size must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
    p.add_argument("--model", choices=sorted(MODEL_SPECS), help="architecture (required)")
    p.add_argument("--checkpoint", help=checkpoint_help)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of a checkpoint that weights_only loading refuses "
                        "(only for files you trust)")
    p.add_argument("--data", choices=["mnist", "cifar10", "digits"],
                   help="dataset (default: the model's own: mlpnet->mnist, resnet20->cifar10, digits_mlp->digits)")
    p.add_argument("--data-dir", help="directory with the dataset files (MNIST idx / CIFAR-10 python batches)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate on a fixed random subset of this many test samples (default: all)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--config", help="JSON file of option values (flags override it)")


def require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise ValueError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")


def load_model(args: argparse.Namespace):
    from ..checkpoint import load_checkpoint

    require(args, "model", "checkpoint")
    spec = MODEL_SPECS[args.model]
    model = load_checkpoint(spec.factory(), args.checkpoint, trust_pickle=args.trust_pickle)
    return spec, model.to(args.device)


def dataset_name(args: argparse.Namespace, spec) -> str:
    from ..data import DATA_SHAPES

    data = args.data or spec.dataset
    if DATA_SHAPES[data] != spec.input_shape:
        raise ValueError(f"--data {data} (inputs {DATA_SHAPES[data]}) does not fit --model {args.model} "
                         f"(inputs {spec.input_shape})")
    return data


def test_set(args: argparse.Namespace, data: str):
    from ..data import load_dataset, subset

    if args.eval_samples is not None and args.eval_samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {args.eval_samples}")
    # fixed split and subset (seed 0): --seed only drives the pruning's sampling
    return subset(load_dataset(data, args.data_dir, "test"), args.eval_samples, seed=0)


def write_outputs(out: str, rows, report: Dict, title: str, model=None, masks=None) -> List[str]:
    """Write sparsity.md, report.json, layer_sparsity.png (and pruned.pt / masks.pt when given)."""
    from ..checkpoint import save_state_dict
    from ..reports import format_table, plot_layer_sparsity, write_json

    os.makedirs(out, exist_ok=True)
    files = []
    if model is not None:
        files.append(save_state_dict(model, os.path.join(out, "pruned.pt")))
    if masks is not None:
        torch.save({k: v.detach().cpu() for k, v in masks.items()}, os.path.join(out, "masks.pt"))
        files.append(os.path.join(out, "masks.pt"))
    with open(os.path.join(out, "sparsity.md"), "w") as f:
        f.write(format_table(rows, title=title))
    return files + [os.path.join(out, "sparsity.md"), write_json(os.path.join(out, "report.json"), report),
                    plot_layer_sparsity({title: rows}, os.path.join(out, "layer_sparsity.png"), title=title)]
