"""The demo: WoodFisher vs global magnitude vs diagonal Fisher on scikit-learn's digits.

``python -m woodfisher demo --out out/demo`` trains a small MLP (64-128-64-10) on the
digits training split for a few seconds, then prunes copies of it one-shot at several
sparsities with each method, prints the test-accuracy table and writes
``accuracy_vs_sparsity.png``, ``layer_sparsity.png`` and ``results.json`` to ``--out``.
Everything is seeded: the same seed gives the same numbers.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import evaluate, load_digits, make_loader
from .models import digits_mlp
from .progress import display, phase
from .reports import (
    plot_accuracy_vs_sparsity,
    plot_layer_sparsity,
    plots_available,
    skip_plots,
    sparsity_table,
    write_json,
)

__all__ = ["DEMO_METHODS", "DEMO_SPARSITIES", "train_digits_mlp", "run_demo"]

#: label -> prune_one_shot keyword arguments. "WoodFisher (defaults)" is what a new user
#: gets: Fisher blocks as large as the number of gradients of a step (block_size="auto"),
#: dampening relative to the Fisher scale (damp="auto") and, for high sparsities, several
#: steps that recompute the Fisher on the way (num_steps="auto"; the num_grads gradients
#: are split over them). The paper's one-shot setting (whole-layer blocks, damp 1e-5, one
#: step) is one row for comparison; the diagonal Fisher uses the same defaults.
DEMO_METHODS: Dict[str, dict] = {
    "WoodFisher (defaults)": dict(method="woodfisher"),
    "WoodFisher (paper: layer blocks, 1 step)": dict(method="woodfisher", block_size=None, damp=1e-5, num_steps=1),
    "Global magnitude": dict(method="global_magnitude"),
    "Diagonal Fisher (joint)": dict(method="diag_fisher"),
}
DEMO_HIDDEN = (128, 64)


def train_digits_mlp(train: torch.utils.data.Dataset, hidden: Sequence[int] = (64, 32), epochs: int = 60,
                     lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Train :func:`woodfisher.models.digits_mlp` with Adam (CPU, a few seconds); returns it in eval mode."""
    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = train.tensors if isinstance(train, torch.utils.data.TensorDataset) else next(
        iter(make_loader(train, len(train))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):  # plain tensor indexing: a DataLoader costs more than the tiny steps
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def kwargs_curvature(kwargs: dict) -> bool:
    """Whether the method of these prune_one_shot kwargs uses a Fisher (not a magnitude baseline)."""
    from .methods import METHODS
    return METHODS[kwargs.get("method", "woodfisher")].curvature != "none"


def _print_table(sparsities: Sequence[float], results: Dict[str, List[float]], dense: float) -> str:
    widths = [max(len(m), 8) for m in results]
    head = f"{'sparsity':>9} | " + " | ".join(f"{m:>{w}}" for m, w in zip(results, widths))
    lines = [f"dense test accuracy: {100 * dense:.2f}%", head, "-" * len(head)]
    for i, s in enumerate(sparsities):
        lines.append(f"{100 * s:>8.0f}% | " + " | ".join(
            f"{100 * accs[i]:>{w - 1}.2f}%" for accs, w in zip(results.values(), widths)))
    text = "\n".join(lines)
    print(text)
    return text


DEMO_SPARSITIES = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95)


def run_demo(out_dir: str = "out/demo", sparsities: Sequence[float] = DEMO_SPARSITIES,
             seed: int = 0, methods: Optional[Dict[str, dict]] = None, epochs: int = 30,
             num_grads: int = 512, hidden: Sequence[int] = DEMO_HIDDEN, progress: bool = False,
             force_progress: bool = False) -> dict:
    """Run the demo; returns the results dict also written to ``out_dir/results.json``.

    Args:
        out_dir: output directory (created).
        sparsities: target sparsities as fractions in [0, 1).
        seed: seeds the data split, the training and the Fisher sampling.
        methods: label -> prune_one_shot kwargs (default :data:`DEMO_METHODS`).
        epochs: training epochs of the MLP.
        num_grads: Fisher gradients m (one sample each).
        hidden: hidden widths of the MLP.
        progress: one display over the training and the pruning runs (a live line on a terminal,
            plain lines in a log; :mod:`woodfisher.progress`); False: none. ``force_progress``:
            the CLI's ``--progress`` (shown despite ``TQDM_DISABLE``, a line for every phase in a log).

    Every op here is tiny: with OMP_NUM_THREADS=1 (what scripts/demo.sh sets) it runs
    faster than with several threads. The thread count is not changed in-process:
    with torch 2.13's MKL, changing it mid-process breaks later batched LU solves.
    """
    methods = DEMO_METHODS if methods is None else methods
    if not sparsities:
        raise ValueError("sparsities is empty")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsities must lie in [0, 1) (fractions), got {s}")
    with display(progress, "woodfisher demo", force=force_progress):
        return _run(out_dir, list(sparsities), seed, methods, epochs, num_grads, tuple(hidden), progress)


def _run(out_dir, sparsities, seed, methods, epochs, num_grads, hidden, progress) -> dict:
    from .pruner import prune_one_shot

    t_start = time.perf_counter()
    with phase("training the digits MLP"):
        train, test = load_digits("train", seed=seed), load_digits("test", seed=seed)
        model = train_digits_mlp(train, hidden=hidden, epochs=epochs, seed=seed)
    t_train = time.perf_counter() - t_start
    dense = evaluate(model, test)
    arch = "-".join(str(h) for h in (64, *hidden, 10))
    print(f"trained digits MLP {arch} on {len(train)} samples in {t_train:.1f} s")
    m = num_grads
    results: Dict[str, List[float]] = {}
    damps: Dict[str, List[Optional[float]]] = {}
    overlaps: Dict[str, List[Optional[float]]] = {}
    tables: Dict[str, list] = {}
    with phase("pruning runs", total=len(methods) * len(sparsities), unit="run") as runs:
        for label, kwargs in methods.items():
            accs, damps[label], overlaps[label] = [], [], []
            for s in sparsities:
                pruned = copy.deepcopy(model)
                loader = make_loader(train, 256, shuffle=True, seed=seed)  # same data order for every run
                with warnings.catch_warnings():  # the overlap is printed below instead
                    warnings.filterwarnings("ignore", ".*the same weights as magnitude pruning", UserWarning)
                    res = prune_one_shot(pruned, loader, sparsity=s, num_grads=m, seed=seed, progress=progress,
                                         **kwargs)
                accs.append(evaluate(pruned, test))
                damps[label].append(res.damp)
                overlaps[label].append(res.magnitude_overlap)
                if s == max(sparsities):
                    tables[label] = sparsity_table(res, model=pruned, input_shape=(64,))
                runs.update(1)
            results[label] = accs
    print()
    text = _print_table(sparsities, results, dense)
    used = [f"damp used by {label} (per sparsity): " + ", ".join("-" if d is None else f"{d:.3g}" for d in ds)
            for label, ds in damps.items() if any(d is not None for d in ds)]
    if used:
        print("\n".join(used))
        text += "\n" + "\n".join(used)
    print("\npruned weights shared with global magnitude pruning (1.0 = the same mask):")
    for label, values in overlaps.items():
        if kwargs_curvature(methods[label]):
            print(f"  {label}: " + ", ".join(f"{100 * s:.0f}%: {v:.3f}" for s, v in zip(sparsities, values)
                                          if v is not None))
    os.makedirs(out_dir, exist_ok=True)
    curves = {k: [(100 * s, 100 * a, 0.0) for s, a in zip(sparsities, v)] for k, v in results.items()}
    if plots_available():
        files = [plot_accuracy_vs_sparsity(curves, os.path.join(out_dir, "accuracy_vs_sparsity.png"),
                                           title="One-shot pruning, MLP on scikit-learn digits",
                                           dense_accuracy=100 * dense),
                 plot_layer_sparsity(tables, os.path.join(out_dir, "layer_sparsity.png"),
                                     title=f"Per-layer sparsity at {100 * max(sparsities):.0f}% overall")]
    else:
        skip_plots(["accuracy_vs_sparsity.png", "layer_sparsity.png"])
        files = []
    summary = {"dataset": "scikit-learn digits", "train_samples": len(train), "test_samples": len(test),
               "model": f"digits_mlp{hidden}", "seed": seed, "num_grads": m, "dense_accuracy": dense,
               "sparsities": list(sparsities), "accuracy": results, "damp": damps,
               "magnitude_overlap": overlaps, "methods": methods,
               "layer_sparsity_at_max": tables, "table": text,
               "seconds": time.perf_counter() - t_start}
    files.append(write_json(os.path.join(out_dir, "results.json"), summary))
    print(f"\nwrote: {', '.join(files)}  ({summary['seconds']:.1f} s)")
    return summary
