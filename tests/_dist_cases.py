"""Scenarios of tests/test_distributed_calls.py, run by ``_dist_worker.run_suite`` in every gloo process:
calls whose ranks differ (an option, the model, the data, the steps), and what every rank must do alike
(progress and notes, search_damp's losses, estimate_memory's shard, with_damp of a sharded curvature).
Each returns what the tests check."""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from _dist_worker import _fsdp, _loaders, _mlp, _small, _weights
from torch import nn

from woodfisher import GradualPruner, estimate_curvature, prune_one_shot, prune_with


def _small_other_init():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))


def _with_damp(rank, world, loaders, **opts):
    """Sharded estimate at damp 1e-4, ``with_damp(1e-2)``, prune_with; rank 0: one process estimating at 1e-2."""
    curv = estimate_curvature(_mlp(), loaders[rank], progress=False, damp=1e-4, **opts).with_damp(1e-2)
    model = _mlp()
    out = {"masks": prune_with(model, curv, 0.7).masks, "weights": _weights(model)}
    if rank == 0:
        ref_curv = estimate_curvature(_mlp(), [b for p in loaders for b in p], progress=False, group=None, damp=1e-2,
                                      **opts)
        ref = _mlp()
        out["ref_masks"], out["ref_weights"] = prune_with(ref, ref_curv, 0.7).masks, _weights(ref)
    return out


def _gradual(model, loader, opts):
    kwargs = {k: v for k, v in opts.items() if k != "sparsity"}
    return GradualPruner(model, loader, final_sparsity=0.6, start_step=0, end_step=2, frequency=2,
                         initial_sparsity=0.3, **kwargs)


def _refused(rank, world, loaders):
    """Calls that differ between the ranks (an option, the model, the data): {case: (error, model unchanged)}."""
    opts = dict(sparsity=0.5, num_grads=8 * world, block_size=6, damp=1e-3, progress=False)
    other = lambda: nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 4))  # noqa: E731
    many = _loaders(world, 128, (12,), 4, 32, seed=6)[rank]   # enough for num_steps="auto" to plan several steps
    once = (lambda: iter(many)) if rank else (lambda: many)  # noqa: E731 - rank 1: a single-pass loader
    cases = {  # (model, call) on this rank
        "sparsity": (_small, lambda m: prune_one_shot(m, loaders[rank], **dict(opts, sparsity=0.5 + 0.1 * rank))),
        "seed": (_small, lambda m: prune_one_shot(m, loaders[rank], **dict(opts, seed=rank))),
        "architecture": (other if rank else _small, lambda m: prune_one_shot(m, loaders[rank], **opts)),
        "weights": (_small if not rank else _small_other_init, lambda m: prune_one_shot(m, loaders[rank], **opts)),
        "bad_option_one_rank": (_small, lambda m: prune_one_shot(m, loaders[rank], **dict(opts, sparsity=1.5 if rank
                                                                                           else 0.5))),
        "fsdp_bad_option_one_rank": (lambda: _fsdp(_small()), lambda m: prune_one_shot(
            m, loaders[rank], **dict(opts, sparsity=1.5 if rank else 0.5))),
        "fsdp_keep_masks": (lambda: _fsdp(_small()), lambda m: prune_one_shot(m, loaders[rank], keep_masks=True,
                                                                               **opts)),
        "fsdp_gradual": (lambda: _fsdp(_small()), lambda m: GradualPruner(m, loaders[rank], final_sparsity=0.5)),
        "same_bad_option": (_small, lambda m: prune_one_shot(m, loaders[rank], inverse_form="offload", **opts)),
        "gradual_step": (_small, lambda m: _gradual(m, loaders[rank], opts).step(rank)),
        "gradual_bad_step_one_rank": (_small, lambda m: _gradual(m, loaders[rank], opts).step("1" if rank else 0)),
        "no_loader_one_rank": (_small, lambda m: prune_one_shot(m, None if rank else loaders[rank], **opts)),
        "short_loader": (_small, lambda m: prune_one_shot(m, loaders[rank][:1] if rank else loaders[rank], **opts)),
        "short_loader_two_steps": (_small, lambda m: prune_one_shot(
            m, loaders[rank][:1] if rank else loaders[rank], **dict(opts, num_steps=2, num_grads=32))),
        "single_pass_one_rank": (_small, lambda m: prune_one_shot(
            m, once(), **dict(opts, sparsity=0.9, num_grads=128 * world))),
        "with_damp": (_small, lambda m: estimate_curvature(m, loaders[rank], **dict(opts, sparsity=0)).with_damp(
            0.01 * (1 + rank))),
        "prune_with_sparsity": (_small, lambda m: prune_with(
            m, estimate_curvature(m, loaders[rank], **dict(opts, sparsity=0)), 0.5 + 0.1 * rank)),
    }
    out = {}
    for name, (make, call) in cases.items():
        model = make()
        before = _weights(model)
        try:
            call(model)
            error = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            error = (isinstance(exc, ValueError), str(exc))
        out[name] = (error, all(torch.equal(before[k], v) for k, v in _weights(model).items()))
    return out


def _non_member(rank, world, loaders):
    """group=new_group([0]): rank 0 prunes alone, the others are told they are not in the group."""
    group = dist.new_group([0])
    try:
        prune_one_shot(_small(), loaders[rank], sparsity=0.5, num_grads=8, block_size=6, damp=1e-3, progress=False,
                       group=group)
        return {"error": None}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return {"error": (isinstance(exc, ValueError), str(exc))}


def _progress(rank, world, loaders):
    """What each rank writes to stderr with progress=True: prune_one_shot, estimate_curvature + prune_with."""
    import contextlib
    import io

    import woodfisher.progress as progress

    text, seconds = io.StringIO(), progress.LINE_SECONDS
    opts = dict(num_grads=8 * world, block_size=6, damp=1e-3, progress=True)
    progress.LINE_SECONDS = 0.0  # a line for every phase, however short
    try:
        with contextlib.redirect_stderr(text):
            os.environ.pop("TQDM_DISABLE", None)
            prune_one_shot(_small(), loaders[rank], sparsity=0.5, **opts)
            prune_with(_small(), estimate_curvature(_small(), loaders[rank], **opts), 0.5)
    finally:
        progress.LINE_SECONDS = seconds
    return {"stderr": text.getvalue()}


def _search(rank, world, loaders, heldout):
    """search_damp in float64 on every rank (own calibration and held-out batches); rank 0: one process on all."""
    from woodfisher import search_damp

    opts = dict(sparsity=0.6, num_grads=8 * world, block_size=6, progress=False, grid=[1e-4, 1e-2, 1.0])
    dbl = lambda parts: [(x.double(), y) for x, y in parts]  # noqa: E731
    out = {"losses": search_damp(_small().double(), dbl(loaders[rank]), dbl(heldout[rank]), **opts)[1]}
    if rank == 0:
        out["ref"] = search_damp(_small().double(), dbl([b for p in loaders for b in p]),
                                 dbl([b for p in heldout for b in p]), group=None, **opts)[1]
    return out


def _estimate_memory(rank, world, loaders):
    """estimate_memory under the group, then the call at budgets just below / at the rank's estimate."""
    from woodfisher import estimate_memory

    opts = dict(sparsity=0.5, num_grads=8 * world, block_size=6, damp=1e-3)
    out = {"plain": estimate_memory(_small(), **opts)}
    for name, delta in (("below", -1), ("at", 0)):
        budget = out["plain"]["rank_bytes"] + delta
        report = estimate_memory(_small(), memory_budget=budget, **opts)
        try:
            prune_one_shot(_small(), loaders[rank], memory_budget=budget, progress=False, **opts)
            ran = True
        except ValueError:
            ran = False
        out[name] = (report, ran)
    return out


def _same_samples(rank, world, loaders):
    """Warnings of a call where every rank reads rank 0's batches, then of one where each reads its own."""
    out = {}
    for name, loader in (("same", loaders[0]), ("own", loaders[rank])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prune_one_shot(_small(), loader, sparsity=0.5, num_grads=8 * world, block_size=6, damp=1e-3,
                           progress=False)
        out[name] = [str(w.message) for w in caught if "same samples" in str(w.message)]
    return out


def run_cli_error(rank, world, port, out_dir, checkpoint):
    """``woodfisher prune`` under torchrun with an option every rank refuses: its stderr and exit code."""
    import contextlib
    import io

    warnings.simplefilter("ignore")
    from woodfisher.cli import main

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    text = io.StringIO()
    with contextlib.redirect_stderr(text):
        code = main(["prune", "--model", "digits_mlp", "--checkpoint", checkpoint, "--num-grads", "16",
                     "--sparsity", "0.5", "--method", "kfac", "--no-progress", "--out", out_dir])
    torch.save({"code": code, "stderr": text.getvalue()}, os.path.join(out_dir, f"cli_error.rank{rank}.pt"))
