"""``woodfisher demo``: train a small MLP on scikit-learn digits and compare one-shot pruners."""
from __future__ import annotations

import argparse

from ._common import PROGRESS_HELP


def add_parser(sub) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help="train a small MLP on scikit-learn digits and compare one-shot pruners")
    d.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    d.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="target sparsities in percent (default: 50 70 80 85 90 95)")
    d.add_argument("--seed", type=int, default=0, help="seed for training, data split and sampling")
    d.add_argument("--config", help="JSON file of option values (flags override it)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=PROGRESS_HELP)
    d.set_defaults(func=run)
    return d


def run(args: argparse.Namespace) -> int:
    from ..demo import DEMO_SPARSITIES, run_demo

    sparsities = [s / 100.0 for s in args.sparsities] if args.sparsities else list(DEMO_SPARSITIES)
    run_demo(args.out, sparsities=sparsities, seed=args.seed, progress=args.progress is not False,
             force_progress=args.progress is True)
    return 0
