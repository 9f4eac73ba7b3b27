"""``woodfisher report``: per-layer sparsity / FLOPs table (and accuracy) of a checkpoint."""
from __future__ import annotations

import argparse
import os

from ._common import add_model_args, dataset_name, load_model, test_set, write_outputs


def add_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("report", help="per-layer sparsity / FLOPs table (and accuracy) of a checkpoint")
    add_model_args(r, "checkpoint to inspect (required)")
    r.add_argument("--out", default=None, help="also write sparsity.md, report.json, layer_sparsity.png here")
    r.set_defaults(func=run)
    return r


def run(args: argparse.Namespace) -> int:
    from ..data import evaluate
    from ..reports import format_table, sparsity_table, table_totals

    spec, model = load_model(args)
    data = dataset_name(args, spec)
    accuracy, test_len = None, 0
    if data == "digits" or args.data_dir is not None:  # evaluate when the data is at hand
        test = test_set(args, data)
        accuracy, test_len = evaluate(model, test, device=args.device), len(test)
    rows = sparsity_table(model, input_shape=spec.input_shape, names=list(spec.prunable) if spec.prunable else None)
    title = f"{args.model}: {os.path.basename(args.checkpoint)}"
    print(format_table(rows, title=title))
    if accuracy is not None:
        print(f"accuracy: {100 * accuracy:.2f}% (test set, {test_len} samples)")
    if args.out:
        report = {"model": args.model, "checkpoint": args.checkpoint, "data": data, "accuracy": accuracy,
                  "eval_samples": test_len, "layers": rows, "totals": table_totals(rows)}
        print("wrote: " + ", ".join(write_outputs(args.out, rows, report, title)))
    return 0
