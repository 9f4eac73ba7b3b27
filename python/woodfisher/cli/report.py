"""``woodfisher report``: per-layer sparsity / FLOPs table (and accuracy or loss) of a model.

The model is a built-in one with its checkpoint, or the user's own (``--model
mypkg.models:build [--checkpoint w.pt]``); the table lists the weights the pruner
prunes by default (:func:`woodfisher.resolve_targets`: unique tensors, tied weights once),
or a built-in model's standard set.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from ._common import (
    add_model_args,
    dataset_name,
    evaluator,
    is_import_path,
    load_model,
    make_out_dir,
    user_functions,
    write_outputs,
)
from ._shapes import flops_note, input_shape


def add_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("report", help="per-layer sparsity / FLOPs table (and accuracy or loss) of a model")
    add_model_args(r, "checkpoint to inspect")
    r.add_argument("--out", default=None, help="also write sparsity.md, report.json, layer_sparsity.png here")
    r.set_defaults(func=run)
    return r


def _other_sparse(model) -> list:
    """Weights outside the default targets that hold exact zeros and can be pruned when named (recurrent
    matrices, transposed convolutions, embeddings: ``prune --modules`` prunes them): listed too, so that a
    report of such a checkpoint does not leave them out of the table and its total."""
    from ..targets import resolve_targets

    default = {target.name for target in resolve_targets(model)}
    padding = {f"{name}.weight": module.padding_idx for name, module in model.named_modules()
               if isinstance(module, nn.Embedding) and module.padding_idx is not None}
    found = []
    for name, param in model.named_parameters():
        if name in default or param.dim() < 2 or not param.is_floating_point():
            continue
        rows = torch.ones(param.shape[0], dtype=torch.bool)
        if name in padding:
            rows[padding[name]] = False  # an embedding's padding row is zeros from the start: not pruned
        if not bool((param.detach()[rows] == 0).any()):
            continue
        try:
            found += [target.key for target in resolve_targets(model, [name])]
        except ValueError:  # not prunable even when named (a weight_norm's direction, ...): not listed
            continue
    return found


def run(args: argparse.Namespace) -> int:
    from ..reports import format_table, sparsity_table, table_totals
    from ..targets import resolve_targets

    if is_import_path(args.data):  # report reads no calibration data: a factory here would be silently unused
        raise ValueError(f"--data {args.data!r}: report does not read calibration data; pass held-out batches "
                         f"as --eval-data {args.data} for their mean loss")
    if args.out:
        make_out_dir(args.out)
    spec, model = load_model(args)
    shape = input_shape(args, spec, model)
    data = dataset_name(args, spec)
    metric, measure, samples = evaluator(args, data, user_functions(args, spec))
    value = measure(model) if measure is not None else None
    if spec is not None:
        names = list(spec.prunable) if spec.prunable else None
    else:
        order = {name: i for i, (name, _) in enumerate(model.named_parameters())}  # the model's order
        names = sorted([target.key for target in resolve_targets(model)] + _other_sparse(model),
                       key=lambda name: order.get(name, len(order)))
    rows = sparsity_table(model, input_shape=shape, names=names)
    title = f"{args.model}: {os.path.basename(args.checkpoint) if args.checkpoint else 'factory weights'}"
    print(format_table(rows, title=title))
    flops_note(shape)
    if metric == "accuracy":
        print(f"accuracy: {100 * value:.2f}% (test set, {samples} samples)")
    elif metric == "loss":
        print(f"held-out loss: {value:.4f}")
    if args.out:
        report = {"model": args.model, "checkpoint": args.checkpoint, "data": data or args.data, "metric": metric,
                  "value": value, "eval_samples": samples, "layers": rows, "totals": table_totals(rows)}
        if metric == "accuracy":
            report["accuracy"] = value
        print("wrote: " + ", ".join(write_outputs(args.out, rows, report, title)))
    return 0
