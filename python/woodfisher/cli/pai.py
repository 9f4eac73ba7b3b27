"""``python -m woodfisher pai``: prune a model at initialization, optionally train it with the masks held.

The model is a built-in architecture, freshly initialised (seeded by ``--seed``) unless
``--checkpoint`` gives its initial weights, or your own (``--model mypkg.models:build``,
with ``--data mypkg.data:loader`` for the scoring batches, ``--loss`` / ``--batch-adapter``
/ ``--eval-data`` as for ``prune``). Writes to --out: masks.pt, pruned.pt (state dict, masks
made permanent), sparsity.md, report.json (config, timings, collapsed layers, accuracy or
held-out loss) and layer_sparsity.png.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from ..config import MODES
from ..models import MODEL_SPECS
from ..pai.criteria import CRITERIA
from ._common import (
    PROGRESS_HELP,
    add_model_args,
    dataset_name,
    evaluator,
    factory_loader,
    is_import_path,
    load_model,
    make_out_dir,
    metric_values,
    sparsity_type,
    user_functions,
    write_outputs,
)
from ._shapes import flops_note, input_shape


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``pai`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("pai", help="prune at initialization (Hutchinson / Fisher diagonal, SNIP, "
                                          "GraSP, SynFlow, ...) and optionally train")
    add_model_args(p, "", (("--sparsity",), dict(type=sparsity_type, help="target fraction of zeros in [0, 1)")))
    for action in p._actions:
        if action.dest == "checkpoint":
            action.help = ("initial weights to prune (optional: a built-in model is freshly initialised, seeded by "
                           "--seed; your own factory's model is used as it returns it)")
    p.add_argument("--criterion", default="hutchinson", choices=CRITERIA,
                   help="saliency of a weight at initialization: hutchinson / obd_hutchinson / hutchinson_taylor "
                        "(Hessian diagonal by Hutchinson probes), fisher / fisher_taylor (empirical Fisher diagonal), "
                        "snip, grasp, synflow, magnitude or random (formulas: woodfisher.pai.criteria)")
    p.add_argument("--mode", default="global", choices=MODES,
                   help="global = one ranking across layers, layerwise = the same sparsity in every layer")
    p.add_argument("--num-probes", type=int, default=8, help="Hutchinson probes per scoring batch")
    p.add_argument("--score-samples", type=int, default=512,
                   help="training samples of a built-in dataset used for scoring (a --data factory's loader is "
                        "used whole)")
    p.add_argument("--score-batch-size", type=int, default=128,
                   help="samples per scoring batch of a built-in dataset")
    p.add_argument("--warmup-batches", type=int, default=10, help="BatchNorm warm-up batches before scoring")
    p.add_argument("--no-warmup", action="store_true", help="skip the BatchNorm warm-up")
    p.add_argument("--min-density", type=float, default=0.0, help="minimum fraction kept per layer")
    p.add_argument("--synflow-iterations", type=int, default=100,
                   help="synflow: rounds of scoring and pruning (exponential schedule to --sparsity)")
    p.add_argument("--modules", nargs="+", default=None,
                   help="weights to prune (default: the model's standard set; 'all' = every default target)")
    p.add_argument("--exclude", nargs="+", default=None,
                   help="weights not to prune, taken out of --modules' (names, module names or quoted shell-style "
                        "patterns: 'fc*')")
    p.add_argument("--train-epochs", type=float, default=0.0, help="train the pruned model (0 = no training)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay of the training")
    p.add_argument("--seed", type=int, default=0, help="seed for the initialisation, probes and data order")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=PROGRESS_HELP)
    p.add_argument("--out", default="out/pai", help="output directory (default: out/pai)")
    p.set_defaults(func=run)
    p.api_names = {"params": "modules"}  # prune_at_init's name of --modules, for the messages (see _spelling)
    return p


def _initial_model(args: argparse.Namespace):
    """(built-in ModelSpec or None, model): a fresh built-in model unless a checkpoint or a factory is given."""
    if is_import_path(args.model) or args.checkpoint is not None:
        return load_model(args)
    spec = MODEL_SPECS[args.model]
    return spec, spec.factory().to(args.device)


def _loader(args: argparse.Namespace, data: Optional[str], samples: Optional[int], batch_size: int):
    """Batches of the --data factory (a fresh call), or of the built-in training set (``samples`` of it)."""
    from ..data import load_dataset, make_loader, subset

    loader = factory_loader(args)
    if loader is not None:
        return loader
    if data is None:
        raise ValueError("--data is required for your own model: the import path of a function returning "
                         "batches (e.g. mypkg.data:train_loader), or a built-in dataset name")
    train_set = load_dataset(data, args.data_dir, "train", seed=args.seed)
    if samples is not None:
        train_set = subset(train_set, samples, seed=args.seed)
    return make_loader(train_set, batch_size, shuffle=True, seed=args.seed)


def _evaluate(measure, model):
    """The metric of ``model`` (an ``evaluation`` phase), or None without a metric."""
    from ..progress import phase

    if measure is None:
        return None
    with phase("evaluation"):
        return measure(model)


def run(args: argparse.Namespace) -> int:
    from ..config import check_int
    from ..pai.prune import prune_at_init
    from ..pai.training import attach_masks, make_permanent, train
    from ..progress import display, phase
    from ..reports import format_table, sparsity_table, table_totals

    for name in ("score_samples", "score_batch_size", "batch_size", "num_probes", "synflow_iterations"):
        check_int("--" + name.replace("_", "-"), getattr(args, name))
    check_int("--warmup-batches", args.warmup_batches, low=0)
    if args.train_epochs < 0:
        raise ValueError(f"--train-epochs must be >= 0, got {args.train_epochs}")
    make_out_dir(args.out)
    torch.manual_seed(args.seed)
    progress = args.progress is not False  # None: where woodfisher.progress.output_mode says
    with display(progress, "woodfisher pai", force=args.progress is True) as shown:
        with phase("data"):
            spec, model = _initial_model(args)
            shape = input_shape(args, spec, model)
            data = dataset_name(args, spec)
            functions = user_functions(args, spec)
            metric, measure, samples = evaluator(args, data, functions)
            score_loader = _loader(args, data, args.score_samples, args.score_batch_size)
        default = list(spec.prunable) if spec is not None and spec.prunable else None
        modules = None if args.modules == ["all"] else (args.modules or default)
        t0 = time.perf_counter()
        result = prune_at_init(model, score_loader, sparsity=args.sparsity, criterion=args.criterion,
                               mode=args.mode, params=modules, exclude=args.exclude, num_probes=args.num_probes,
                               warmup_batches=0 if args.no_warmup else args.warmup_batches,
                               min_density=args.min_density, synflow_iterations=args.synflow_iterations,
                               input_shape=shape, seed=args.seed,
                               progress=progress, **functions)
        seconds = time.perf_counter() - t0
        at_init, after, train_stats = _evaluate(measure, model), None, None
        if args.train_epochs > 0:
            attach_masks(model, result.masks)
            loader = _loader(args, data, None, args.batch_size)
            train_stats = train(model, loader, epochs=args.train_epochs, lr=args.lr, weight_decay=args.weight_decay,
                                progress=progress, **functions)
            make_permanent(model)
            after = _evaluate(measure, model)
        with phase("writing"):
            rows = sparsity_table(result, model=model, input_shape=shape)
            title = f"{args.model} PaI {args.criterion} ({args.mode}) at {100 * args.sparsity:.1f}% target sparsity"
            report = {"model": args.model, "data": data or args.data, "checkpoint": args.checkpoint,
                      "metric": metric, **metric_values(metric, at_init=at_init, after_training=after),
                      "eval_samples": samples, "sparsity": result.sparsity, "criterion": args.criterion,
                      "collapsed": result.collapsed, "train": train_stats, "seconds": seconds,
                      "timings": result.timings, "phases": dict(shown.seconds), "config": result.config,
                      "layers": rows, "totals": table_totals(rows)}
            files = write_outputs(args.out, rows, report, title, model=model, masks=result.masks)
    print(format_table(rows, title=title))
    flops_note(shape)
    if result.collapsed:
        print(f"LAYER COLLAPSE: {', '.join(result.collapsed)} pruned to (near) 100% (try --min-density)")
    msg = f"sparsity {100 * result.sparsity:.2f}%; scoring took {seconds:.1f} s"
    if metric == "accuracy":
        msg += f"; accuracy at init {100 * at_init:.2f}%"
        if after is not None:
            msg += f", after {args.train_epochs:g} epochs {100 * after:.2f}% ({samples} test samples)"
    elif metric == "loss":
        msg += f"; held-out loss at init {at_init:.4f}" + (f", after training {after:.4f}" if after is not None else "")
    print(msg)
    print("time per phase: " + shown.summary())
    print("wrote: " + ", ".join(files))
    return 0
