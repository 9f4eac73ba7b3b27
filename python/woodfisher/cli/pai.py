"""``python -m woodfisher pai``: prune a freshly initialised model (or the initial weights in
``--checkpoint``) before training, optionally train it with the masks held fixed.

Writes to --out: masks.pt, pruned.pt (state dict, masks made permanent), sparsity.md,
report.json (config, timings, collapsed layers, accuracy) and layer_sparsity.png.
"""
from __future__ import annotations

import argparse
import time

import torch

from ..models import MODEL_SPECS
from ..pai.criteria import CRITERIA
from ._common import add_model_args, dataset_name, load_model, require, sparsity_type, test_set, write_outputs


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``pai`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("pai", help="prune at initialization (Hutchinson / Fisher diagonal, SNIP, "
                                          "GraSP, SynFlow, ...) and optionally train")
    add_model_args(p, "initial weights to prune (default: a fresh initialisation seeded by --seed)")
    p.add_argument("--sparsity", type=sparsity_type, help="target fraction of zeros in [0, 1) (required)")
    p.add_argument("--criterion", default="hutchinson", choices=CRITERIA)
    p.add_argument("--mode", default="global", choices=["global", "layerwise"])
    p.add_argument("--num-probes", type=int, default=8, help="Hutchinson probes per scoring batch")
    p.add_argument("--score-samples", type=int, default=512, help="training samples used for scoring")
    p.add_argument("--score-batch-size", type=int, default=128)
    p.add_argument("--warmup-batches", type=int, default=10, help="BatchNorm warm-up batches before scoring")
    p.add_argument("--no-warmup", action="store_true", help="skip the BatchNorm warm-up")
    p.add_argument("--min-density", type=float, default=0.0, help="minimum fraction kept per layer")
    p.add_argument("--synflow-iterations", type=int, default=100)
    p.add_argument("--modules", nargs="+", default=None,
                   help="weights to prune (default: the model's standard set; 'all' = every conv/fc)")
    p.add_argument("--train-epochs", type=float, default=0.0, help="train the pruned model (0 = no training)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="seed for the initialisation, probes and data order")
    p.add_argument("--out", default="out/pai", help="output directory (default: out/pai)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..config import check_int
    from ..data import evaluate, load_dataset, make_loader, subset
    from ..pai.prune import prune_at_init
    from ..pai.training import attach_masks, make_permanent, train
    from ..reports import format_table, sparsity_table, table_totals

    require(args, "model", "sparsity")
    for name in ("score_samples", "score_batch_size", "batch_size", "num_probes", "synflow_iterations"):
        check_int("--" + name.replace("_", "-"), getattr(args, name))
    check_int("--warmup-batches", args.warmup_batches, low=0)
    if args.train_epochs < 0:
        raise ValueError(f"--train-epochs must be >= 0, got {args.train_epochs}")
    torch.manual_seed(args.seed)
    if args.checkpoint:
        spec, model = load_model(args)
    else:
        spec = MODEL_SPECS[args.model]
        model = spec.factory().to(args.device)
    data = dataset_name(args, spec)
    train_set = load_dataset(data, args.data_dir, "train", seed=args.seed)
    test = test_set(args, data)
    score_loader = make_loader(subset(train_set, args.score_samples, seed=args.seed), args.score_batch_size,
                               shuffle=True, seed=args.seed)
    modules = None if args.modules == ["all"] else (args.modules or (list(spec.prunable) if spec.prunable else None))
    t0 = time.perf_counter()
    result = prune_at_init(model, score_loader, sparsity=args.sparsity, criterion=args.criterion, mode=args.mode,
                           loss_fn=spec.loss_fn, params=modules, num_probes=args.num_probes,
                           warmup_batches=0 if args.no_warmup else args.warmup_batches, min_density=args.min_density,
                           synflow_iterations=args.synflow_iterations, input_shape=spec.input_shape, seed=args.seed)
    seconds = time.perf_counter() - t0
    acc_init = evaluate(model, test, device=args.device)
    train_stats, acc = None, None
    if args.train_epochs > 0:
        attach_masks(model, result.masks)
        loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed)
        train_stats = train(model, loader, epochs=args.train_epochs, lr=args.lr, weight_decay=args.weight_decay,
                            loss_fn=spec.loss_fn)
        make_permanent(model)
        acc = evaluate(model, test, device=args.device)
    rows = sparsity_table(result, model=model, input_shape=spec.input_shape)
    title = f"{args.model} PaI {args.criterion} ({args.mode}) at {100 * args.sparsity:.1f}% target sparsity"
    report = {"model": args.model, "data": data, "eval_samples": len(test), "sparsity": result.sparsity,
              "criterion": args.criterion, "collapsed": result.collapsed, "accuracy_at_init": acc_init,
              "accuracy_after_training": acc, "train": train_stats, "seconds": seconds, "timings": result.timings,
              "config": result.config, "layers": rows, "totals": table_totals(rows)}
    files = write_outputs(args.out, rows, report, title, model=model, masks=result.masks)
    print(format_table(rows, title=title))
    if result.collapsed:
        print(f"LAYER COLLAPSE: {', '.join(result.collapsed)} pruned to (near) 100% (try --min-density)")
    msg = f"sparsity {100 * result.sparsity:.2f}%; scoring took {seconds:.1f} s; accuracy at init {100 * acc_init:.2f}%"
    if acc is not None:
        msg += f", after {args.train_epochs:g} epochs {100 * acc:.2f}% ({len(test)} test samples)"
    print(msg)
    print("wrote: " + ", ".join(files))
    return 0
