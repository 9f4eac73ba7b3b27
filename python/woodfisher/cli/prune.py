"""``woodfisher prune``: one-shot prune a model and write the pruned weights and reports.

The model is a built-in one (``--model resnet20 --checkpoint w.pt``) or the user's own:
``--model mypkg.models:build [--checkpoint w.pt] --data mypkg.data:calibration_loader
[--eval-data mypkg.data:val_loader] [--loss ...] [--batch-adapter ...]`` (import paths of
functions called with no argument; see :mod:`._common`), on the command line or in a
``--config`` file. One progress line follows every phase (data, gradients, inverses,
selection, update, evaluation, writing) and the seconds of each are printed at the end
and written to report.json (``phases``).

Every option of :class:`woodfisher.PruneConfig` that makes sense on a command line is a
flag whose destination is the field's name, so a ``--config`` file takes the API's names
(``{"num_grads": 256, "obs_update": false}``; the flag spellings work too).

Under ``torchrun`` the command prunes collectively over all ranks (:mod:`.cli._dist`):
``torchrun --nproc-per-node 4 -m woodfisher prune --device cuda ...`` (NCCL) or
``--device cpu`` (gloo); ``--num-grads`` is the total over all ranks.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

from ..config import AUTO_BLOCK_PER_GRAD, BACKENDS, FORMS, MODES, SCHEDULES
from ..methods import METHODS
from ..per_sample import PER_SAMPLE_PATHS
from ._common import (
    PROGRESS_HELP,
    add_model_args,
    block_size_type,
    call_factory,
    damp_type,
    dataset_name,
    evaluator,
    is_import_path,
    load_model,
    make_out_dir,
    method_type,
    metric_values,
    require,
    sparsities_type,
    steps_type,
    user_functions,
    write_outputs,
)
from ._shapes import flops_note, input_shape

#: PruneConfig fields that are flags of this command (same names as the API).
CONFIG_FIELDS = ("sparsity", "method", "mode", "block_size", "num_grads", "fisher_batch_size", "damp", "num_steps",
                 "step_schedule", "obs_update", "joint_update", "woodtaylor", "beta", "pattern", "modules", "exclude",
                 "seed",
                 "group_exact", "memory_budget",
                 "sampled_fisher", "backend", "inverse_form", "per_sample_grads", "min_density", "progress")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help="one-shot prune a model and write the pruned weights and reports")
    add_model_args(p, "checkpoint of the dense model",
                   (("--sparsity",), dict(type=sparsities_type, help="target fraction of zeros in [0, 1) (with "
                                          "--pattern N:M it may be omitted: 1 - N/M), or per weight: a JSON object "
                                          "'{\"features.*\": 0.9, \"fc\": 0.5}' or 'features.*=0.9,fc=0.5' (names "
                                          "or patterns as --modules takes them; each weight pruned to its own)")))
    p.add_argument("--method", default="woodfisher", type=method_type, choices=METHODS.keys(),
                   help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()) + "; or your own: the "
                        "import path of a woodfisher.methods.PruningMethod class, e.g. mypkg.methods:SNIP or "
                        "methods.py:SNIP (registered under its name)")
    p.add_argument("--mode", default="global", choices=MODES,
                   help="global = joint ranking across layers, layerwise = independent")
    p.add_argument("--block-size", type=block_size_type, default="auto",
                   help=f"Fisher block (chunk) size c: a number, 'layer' (whole layers) or 'auto' (default: c = "
                        f"{AUTO_BLOCK_PER_GRAD} x the gradients of a step)")
    p.add_argument("--num-grads", type=int, default=512,
                   help="number of gradients m (fisher subsample size), over all steps")
    p.add_argument("--fisher-batch-size", type=int, default=1, help="samples averaged per gradient")
    p.add_argument("--damp", type=damp_type, default="auto",
                   help="dampening lambda, or 'auto' (default: relative to the Fisher; the paper's is 1e-5)")
    p.add_argument("--num-steps", type=steps_type, default="auto",
                   help="pruning steps with Fisher recomputation, or 'auto' (default: more steps for higher sparsity)")
    p.add_argument("--step-schedule", default="geometric", choices=SCHEDULES,
                   help="sparsities of the steps: geometric or linear")
    p.add_argument("--obs-update", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the OBS weight update (--no-obs-update: only zero the pruned weights)")
    p.add_argument("--joint-update", action=argparse.BooleanOptionalAction, default=False,
                   help="unstructured: the joint OBS update of each block's pruned weights (paper Sec. 4.2) instead "
                        "of the sum of single-weight updates (default: off)")
    p.add_argument("--woodtaylor", action="store_true", help="use the WoodTaylor statistic (first-order term)")
    p.add_argument("--beta", type=float, default=0.0, help="FLOPs-aware exponent (0 = off)")
    p.add_argument("--pattern", default=None, help="semi-structured N:M pattern (e.g. 2:4; gives --sparsity 1 - N/M) "
                   "or 'rows'")
    p.add_argument("--modules", nargs="+", default=None,
                   help="module or weight names to prune, or shell-style patterns over full names "
                        "(quoted: 'blocks.*.mlp.*'; default: the model's standard set)")
    p.add_argument("--exclude", nargs="+", default=None,
                   help="weights not to prune, taken out of the --modules ones (or those a per-weight --sparsity "
                        "selects; each entry must remove one of them): names, module names (all the weights "
                        "they hold) or shell-style patterns (quoted: 'fc*'; e.g. --exclude conv1 fc)")
    p.add_argument("--group-exact", action=argparse.BooleanOptionalAction, default=True,
                   help="exact group statistic for patterns (--no-group-exact: the paper's Eq. 18)")
    p.add_argument("--memory-budget", type=str, default=None,
                   help="bytes for gradients + inverses: an int or a size such as 4GiB or 1.5GB")
    p.add_argument("--sampled-fisher", action="store_true", help="draw targets from the model's predictions")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend")
    p.add_argument("--inverse-form", default="auto", choices=FORMS,
                   help="force a form of the block inverses")
    p.add_argument("--per-sample-grads", default="vmap", choices=PER_SAMPLE_PATHS,
                   help="how per-sample gradients are formed: torch.func vmap or torch's expanded weights")
    p.add_argument("--min-density", type=float, default=0.0, help="minimum fraction kept per layer")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help=PROGRESS_HELP)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data order for the Fisher gradients (and label sampling)")
    p.add_argument("--out", default="out/prune", help="output directory (default: out/prune)")
    p.set_defaults(func=run)
    return p


def _calibration(args: argparse.Namespace, data: Optional[str], rank: int = 0, world: int = 1):
    """The loader of the Fisher batches: the --data factory's, or the built-in training set's
    (under torchrun, rank r reads every ``world``-th sample from r; a factory shards its own data)."""
    from ..data import load_dataset, make_loader
    from ._dist import shard

    if is_import_path(args.data):
        loader = call_factory(args.data, "--data")
        if loader is None or not hasattr(loader, "__iter__"):
            raise ValueError(f"--data {args.data!r} returned {type(loader).__name__}, not an iterable of batches")
        return loader
    if data is None:
        raise ValueError("--data is required for your own model: the import path of a function returning "
                         "calibration batches (e.g. mypkg.data:calibration_loader), or a built-in dataset name")
    train = shard(load_dataset(data, args.data_dir, "train"), rank, world)
    batch = args.fisher_batch_size * max(1, 256 // args.fisher_batch_size)
    return make_loader(train, batch, shuffle=True, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from ._dist import torchrun_group

    with torchrun_group(args) as (rank, world):  # torchrun: one collective call on every rank
        return _run(args, rank, world)


def _run(args: argparse.Namespace, rank: int, world: int) -> int:
    from ..config import PruneConfig
    from ..progress import display, phase
    from ..pruner import prune_one_shot
    from ..reports import format_table, sparsity_table, table_totals

    require(args, "sparsity")
    per_weight = isinstance(args.sparsity, dict)
    if rank == 0:
        make_out_dir(args.out)
    for name in ("num_grads", "fisher_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    shown_here = rank == 0 and args.progress is not False  # None: where woodfisher.progress.output_mode says
    with display(shown_here, "woodfisher prune", force=shown_here and args.progress is True) as shown:
        with phase("data"):
            spec, model = load_model(args)
            shape = input_shape(args, spec, model) if rank == 0 else None
            data = dataset_name(args, spec)
            options = {f: getattr(args, f) for f in CONFIG_FIELDS}
            options["progress"] = shown_here  # one progress line under torchrun
            if options["modules"] is None and spec is not None and spec.prunable:
                options["modules"] = list(spec.prunable)
            # every option checked before any data is read
            config = PruneConfig(**user_functions(args, spec), **options)
            metric, measure, samples = evaluator(args, data, user_functions(args, spec))
            loader = _calibration(args, data, rank, world)
        before = after = None
        if measure is not None and rank == 0:
            with phase("evaluation"):
                before = measure(model)
        t0 = time.perf_counter()
        result = prune_one_shot(model, loader, config)
        seconds = time.perf_counter() - t0
        if rank:  # under torchrun every rank holds the same pruned model; rank 0 reports
            return 0
        if measure is not None:
            with phase("evaluation"):
                after = measure(model)
        with phase("writing"):
            rows = sparsity_table(result, model=model, input_shape=shape)
            target = "at per-weight target sparsities" if per_weight else \
                f"({args.mode}) at {100 * args.sparsity:.1f}% target sparsity"
            title = f"{args.model} {args.method} {target}" + (
                f", damp {result.damp:.3g}" if result.damp is not None else "")
            report = {"model": args.model, "data": data or args.data, "checkpoint": args.checkpoint,
                      "world_size": world, "metric": metric,
                      **metric_values(metric, before=before, after=after),
                      "eval_samples": samples, "sparsity": result.sparsity, "damp": result.damp,
                      "magnitude_overlap": result.magnitude_overlap, "collapsed": result.collapsed,
                      "seconds": seconds, "timings": result.timings, "phases": dict(shown.seconds),
                      "config": result.config, "layers": rows, "totals": table_totals(rows)}
            files = write_outputs(args.out, rows, report, title, model=model, masks=result.masks)
    print(format_table(rows, title=title))
    flops_note(shape)
    damp = f"damp {result.damp:.3g}; " if result.damp is not None else ""
    if metric == "accuracy":
        print(f"accuracy before: {100 * before:.2f}%  after: {100 * after:.2f}%  (test set, {samples} samples)")
    elif metric == "loss":
        print(f"held-out loss before: {before:.4f}  after: {after:.4f}")
    steps = len(result.config.get("steps", [1]))
    mode = "layerwise" if per_weight else args.mode
    overlap = "" if result.magnitude_overlap is None or args.method in ("magnitude", "global_magnitude") else \
        f"; mask overlap with {mode} magnitude pruning {100 * result.magnitude_overlap:.1f}%"
    print(f"sparsity {100 * result.sparsity:.2f}% of the pruned weights; {damp}{steps} step(s); "
          f"pruning took {seconds:.1f} s{overlap}")
    print("time per phase: " + shown.summary())
    print("wrote: " + ", ".join(files))
    return 0
