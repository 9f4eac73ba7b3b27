"""Pruning methods of your own, outside the package, next to the built-in ones on one set of gradients.

Two methods are registered with :func:`woodfisher.register_method`:

- ``snip``, a score-only baseline: ``|w * mean g|`` (SNIP's connection sensitivity), read from the
  per-sample gradients a blockwise curvature keeps (``Curvature.grads``, (B, m, c) in the blocks' layout);
- ``obs_abs``, second order: it ranks by ``|w| / sqrt([F^-1]_qq)`` (the square root of the OBS saliency
  ``w^2 / (2 [F^-1]_qq)``, the same ranking) and applies the OBS update, through the step context's
  building blocks (``ctx.inverse_diagonal``, ``ctx.obs_update``: any form of the inverse).

Both read the curvature :func:`woodfisher.estimate_curvature` builds for "woodfisher" (same kind, same block
size), so :func:`woodfisher.prune_with` prunes copies of one digits MLP with each from one gradient collection.
From the command line: ``woodfisher prune --method examples/custom_method.py:SNIP ...``.

    python examples/custom_method.py            # ~10 s on a CPU
"""
from __future__ import annotations

import argparse
import copy

import woodfisher as wf
from woodfisher.data import evaluate, load_digits
from woodfisher.demo import train_digits_mlp
from woodfisher.methods import PruningMethod, ScoreMethod


class SNIP(ScoreMethod):
    name = "snip"
    curvature = "blockwise"  # for the kept gradients; the inverses are not used
    summary = "|w * mean g| (SNIP) from the kept per-sample gradients"

    def scores(self, ctx):
        grads = ctx.curvature.grads
        if grads is None:
            raise ValueError("method 'snip' needs the gradients kept (not streamed): raise memory_budget")
        return {t.name: (t.effective_weight() * t.unblock(grads[t.name].mean(1))).abs() for t in ctx.targets}


class OBSAbs(PruningMethod):
    name = "obs_abs"
    curvature = "blockwise"
    summary = "|w| / sqrt([F^-1]_qq) ranking with the OBS update"

    def step(self, ctx):
        with ctx.timed("select"):
            keep = ctx.select({t.name: t.effective_weight().abs() / ctx.inverse_diagonal(t).sqrt()
                               for t in ctx.targets})
        with ctx.timed("update"):
            new = {t.name: ctx.obs_update(t, keep[t.name]) for t in ctx.targets}
        return new, keep


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.8, 0.9])
    p.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    p.add_argument("--num-grads", type=int, default=256)
    args = p.parse_args(argv)
    for method in (SNIP, OBSAbs):
        wf.register_method(method, replace=True)
    train, test = load_digits("train"), load_digits("test")
    model = train_digits_mlp(train, epochs=args.epochs)
    x, y = train.tensors
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)]
    curvature = wf.estimate_curvature(model, loader, num_grads=args.num_grads, block_size=64, progress=False)
    table = {"dense": evaluate(model, test)}
    for method in ("woodfisher", "obs_abs", "snip", "global_magnitude"):
        for sparsity in args.sparsities:
            pruned = copy.deepcopy(model)
            if method == "global_magnitude":
                wf.prune_one_shot(pruned, loader, sparsity=sparsity, method=method, progress=False)
            else:
                wf.prune_with(pruned, curvature, sparsity, method=method)
            table[(method, sparsity)] = evaluate(pruned, test)
    print(f"dense {100 * table['dense']:.1f}%")
    for method in ("woodfisher", "obs_abs", "snip", "global_magnitude"):
        cells = "  ".join(f"{100 * s:.0f}%: {100 * table[(method, s)]:5.1f}" for s in args.sparsities)
        print(f"{method:>16}  {cells}")
    return table


if __name__ == "__main__":
    main()
