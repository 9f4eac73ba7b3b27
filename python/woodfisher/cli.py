"""Command line: ``python -m woodfisher demo | prune | report | pai`` (also ``woodfisher ...``).

Every subcommand takes ``--config file.json`` (keys = option names, see
:mod:`woodfisher.config`); flags given on the command line override the file.
Errors in the inputs are printed as one line ``woodfisher: error: ...`` (exit code 2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .config import config_defaults, load_config
from .models import MODEL_SPECS

__all__ = ["build_parser", "main"]

METHOD_CHOICES = ("woodfisher", "magnitude", "global_magnitude", "diag_fisher", "kfac")


def _damp(text: str):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"damp must be a number > 0 or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"damp must be > 0, got {text!r}")
    return value


def _block_size(text: str) -> Optional[int]:
    if text.lower() in ("layer", "none", "whole"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be a positive int or 'layer', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"block size must be >= 1, got {value}")
    return value


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must lie in [0, 1) (a fraction, e.g. 0.9), got {text}")
    return value


def _model_args(p: argparse.ArgumentParser, checkpoint_help: str) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    """The full parser with subcommands demo, prune, report (and pai when available)."""
    parser = argparse.ArgumentParser(prog="woodfisher", description="WoodFisher (OBS) pruning for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="{demo,prune,report,pai}")
    sub.required = True

    d = sub.add_parser("demo", help="train a small MLP on scikit-learn digits and compare one-shot pruners")
    d.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    d.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="target sparsities in percent (default: 50 70 80 85 90 95)")
    d.add_argument("--seed", type=int, default=0, help="seed for training, data split and sampling")
    d.add_argument("--config", help="JSON file of option values (flags override it)")
    d.set_defaults(func=cmd_demo)

    p = sub.add_parser("prune", help="one-shot prune a model and write the pruned weights and reports")
    _model_args(p, "checkpoint of the dense model (required)")
    p.add_argument("--sparsity", type=_sparsity, help="target fraction of zeros in [0, 1) (required)")
    p.add_argument("--method", default="woodfisher", choices=METHOD_CHOICES)
    p.add_argument("--mode", default="global", choices=["global", "layerwise"],
                   help="global = joint ranking across layers, layerwise = independent")
    p.add_argument("--block-size", type=_block_size, default=None,
                   help="Fisher block (chunk) size, or 'layer' for whole-layer blocks (default)")
    p.add_argument("--num-grads", type=int, default=128, help="number of gradients m (fisher subsample size)")
    p.add_argument("--fisher-batch-size", type=int, default=1, help="samples averaged per gradient")
    p.add_argument("--damp", type=_damp, default=1e-5, help="dampening lambda, or 'auto' (default 1e-5)")
    p.add_argument("--num-steps", type=int, default=1, help="pruning steps with Fisher recomputation")
    p.add_argument("--no-obs-update", action="store_true", help="only zero the pruned weights (no OBS update)")
    p.add_argument("--woodtaylor", action="store_true", help="use the WoodTaylor statistic (first-order term)")
    p.add_argument("--beta", type=float, default=0.0, help="FLOPs-aware exponent (0 = off)")
    p.add_argument("--pattern", default=None, help="semi-structured N:M pattern, e.g. 2:4")
    p.add_argument("--modules", nargs="+", default=None,
                   help="module or weight names to prune (default: the model's standard set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order for the Fisher gradients (and label sampling)")
    p.add_argument("--out", default="out/prune", help="output directory (default: out/prune)")
    p.set_defaults(func=cmd_prune)

    r = sub.add_parser("report", help="per-layer sparsity / FLOPs table (and accuracy) of a checkpoint")
    _model_args(r, "checkpoint to inspect (required)")
    r.add_argument("--out", default=None, help="also write sparsity.md, report.json, layer_sparsity.png here")
    r.set_defaults(func=cmd_report)

    try:
        from .pai.cli import add_subparser
    except ImportError:  # the pruning-at-init CLI is optional
        add_subparser = None
    if add_subparser is not None:
        add_subparser(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise RuntimeError("parser has no subcommands")  # pragma: no cover


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file sets the subcommand's defaults, flags override."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = _subparser(parser, args.command)
        sub.set_defaults(**config_defaults(sub, load_config(args.config)))
        args = parser.parse_args(argv)
    return args


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise ValueError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")


def _load_model(args: argparse.Namespace):
    from .checkpoint import load_checkpoint

    _require(args, "model", "checkpoint")
    spec = MODEL_SPECS[args.model]
    model = load_checkpoint(spec.factory(), args.checkpoint, trust_pickle=args.trust_pickle)
    return spec, model.to(args.device)


def _dataset_name(args: argparse.Namespace, spec) -> str:
    from .data import DATA_SHAPES

    data = args.data or spec.dataset
    if DATA_SHAPES[data] != spec.input_shape:
        raise ValueError(f"--data {data} (inputs {DATA_SHAPES[data]}) does not fit --model {args.model} "
                         f"(inputs {spec.input_shape})")
    return data


def _test_set(args: argparse.Namespace, data: str):
    from .data import load_dataset, subset

    if args.eval_samples is not None and args.eval_samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {args.eval_samples}")
    # fixed split and subset (seed 0): --seed only drives the pruning's sampling
    return subset(load_dataset(data, args.data_dir, "test"), args.eval_samples, seed=0)


def _write_outputs(out: str, rows, report: Dict, title: str, model=None, masks=None) -> List[str]:
    """Write sparsity.md, report.json, layer_sparsity.png (and pruned.pt / masks.pt when given)."""
    from .checkpoint import save_state_dict
    from .reports import format_table, plot_layer_sparsity, write_json

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


def cmd_prune(args: argparse.Namespace) -> int:
    from .data import evaluate, load_dataset, make_loader
    from .pruner import prune_one_shot
    from .reports import format_table, sparsity_table, table_totals

    _require(args, "sparsity")
    for name in ("num_grads", "fisher_batch_size", "num_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    spec, model = _load_model(args)
    data = _dataset_name(args, spec)
    test = _test_set(args, data)
    train = load_dataset(data, args.data_dir, "train")
    batch = args.fisher_batch_size * max(1, 256 // args.fisher_batch_size)
    loader = make_loader(train, batch, shuffle=True, seed=args.seed)
    modules = args.modules if args.modules is not None else (list(spec.prunable) if spec.prunable else None)
    acc_before = evaluate(model, test, device=args.device)
    t0 = time.perf_counter()
    result = prune_one_shot(
        model, loader, sparsity=args.sparsity, method=args.method, mode=args.mode, loss_fn=spec.loss_fn,
        block_size=args.block_size, num_grads=args.num_grads, fisher_batch_size=args.fisher_batch_size,
        damp=args.damp, num_steps=args.num_steps, obs_update=not args.no_obs_update,
        woodtaylor=args.woodtaylor, beta=args.beta, modules=modules, pattern=args.pattern, seed=args.seed)
    seconds = time.perf_counter() - t0
    acc_after = evaluate(model, test, device=args.device)
    rows = sparsity_table(result, model=model, input_shape=spec.input_shape)
    title = f"{args.model} {args.method} ({args.mode}) at {100 * args.sparsity:.1f}% target sparsity"
    report = {"model": args.model, "data": data, "checkpoint": args.checkpoint,
              "eval_samples": len(test), "accuracy_before": acc_before, "accuracy_after": acc_after,
              "sparsity": result.sparsity, "damp": result.damp, "seconds": seconds,
              "timings": result.timings, "config": result.config, "layers": rows,
              "totals": table_totals(rows)}
    files = _write_outputs(args.out, rows, report, title, model=model, masks=result.masks)
    print(format_table(rows, title=title))
    print(f"accuracy before: {100 * acc_before:.2f}%  after: {100 * acc_after:.2f}%  "
          f"(test set, {len(test)} samples); sparsity {100 * result.sparsity:.2f}% of the pruned weights; "
          f"pruning took {seconds:.1f} s")
    print("wrote: " + ", ".join(files))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .data import evaluate
    from .reports import format_table, sparsity_table, table_totals

    spec, model = _load_model(args)
    data = _dataset_name(args, spec)
    accuracy, test_len = None, 0
    if data == "digits" or args.data_dir is not None:  # evaluate when the data is at hand
        test = _test_set(args, data)
        accuracy, test_len = evaluate(model, test, device=args.device), len(test)
    rows = sparsity_table(model, input_shape=spec.input_shape, names=list(spec.prunable) if spec.prunable else None)
    title = f"{args.model}: {os.path.basename(args.checkpoint)}"
    print(format_table(rows, title=title))
    if accuracy is not None:
        print(f"accuracy: {100 * accuracy:.2f}% (test set, {test_len} samples)")
    if args.out:
        report = {"model": args.model, "checkpoint": args.checkpoint, "data": data, "accuracy": accuracy,
                  "eval_samples": test_len, "layers": rows, "totals": table_totals(rows)}
        print("wrote: " + ", ".join(_write_outputs(args.out, rows, report, title)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_SPARSITIES, run_demo

    sparsities = [s / 100.0 for s in args.sparsities] if args.sparsities else list(DEMO_SPARSITIES)
    run_demo(args.out, sparsities=sparsities, seed=args.seed)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (2 on bad input, with a one-line message)."""
    try:
        args = parse_args(argv)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"woodfisher: error: {err}", file=sys.stderr)
        return 2
