"""Code run inside the gloo processes that tests/test_distributed.py spawns.

Every scenario prunes on all ranks with per-rank loaders (disjoint data, as a
DistributedSampler gives), and rank 0 also runs the single-process pruning (``group=None``)
on the ranks' batches one after the other: the same m gradients in the same order. Each
rank saves what the tests check to ``<out>/<scenario>.rank<r>.pt``; the assertions live in
the test module.
"""
from __future__ import annotations

import datetime
import os
import time
import traceback
import warnings

import torch
import torch._dynamo  # noqa: F401 - imported here, once, by the forkserver (torch.func imports it lazily)
import torch.distributed as dist
from torch import nn

import woodfisher_kernels as wk
from woodfisher import estimate_curvature, prune_one_shot, prune_with
from woodfisher.distributed import select_sharded
from woodfisher.masks import select_masks
from woodfisher.models import MLPNet, resnet20


def _init(rank, world, port, timeout, backend="gloo"):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _loaders(world, per_rank, shape, classes, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(per_rank * world, *shape, generator=g)
    y = torch.randint(0, classes, (per_rank * world,), generator=g)
    return [[(x[r * per_rank + i: r * per_rank + i + batch], y[r * per_rank + i: r * per_rank + i + batch])
             for i in range(0, per_rank, batch)] for r in range(world)]


def _inverse_bytes(inv) -> int:
    if isinstance(inv, wk.LowRankInverse):
        return (inv.factor.numel() + inv.diag().numel()) * inv.factor.element_size()
    return inv.numel() * inv.element_size()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mlp():
    torch.manual_seed(1)
    return MLPNet()


def _small():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))




def _r20():
    torch.manual_seed(2)
    return resnet20()


def _compare(name, rank, world, make, loaders, wrap=None, **opts):
    """Prune a fresh model on every rank and (rank 0) the single-process reference."""
    model = make()
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    if device.type == "cuda":  # NCCL: the same code, every tensor on this rank's GPU
        model, loaders = model.to(device), [[(x.to(device), y.to(device)) for x, y in p] for p in loaders]
        make = (lambda base: lambda: base().to(device))(make)
    if wrap is not None:
        model = wrap(model)
    res = prune_one_shot(model, loaders[rank], progress=False, **opts)
    out = {"masks": res.masks, "weights": _weights(model), "rank": rank, "sparsity": res.sparsity}
    if rank == 0:
        ref = make()
        ref_res = prune_one_shot(ref, [b for part in loaders for b in part], progress=False, group=None, **opts)
        out["ref_masks"], out["ref_weights"] = ref_res.masks, _weights(ref)
    return {k: ({n: v.cpu() for n, v in d.items()} if isinstance(d, dict) else d) for k, d in out.items()}


def _memory(rank, world, make, loaders, **opts):
    """Per-rank inverse bytes of a sharded curvature against the single-process total."""
    curv = estimate_curvature(make(), loaders[rank], progress=False, **opts)
    out = {"owned": sum(_inverse_bytes(v) for v in curv.inverses.values()),
           "owned_blocks": {n: int(v.shape[0]) for n, v in curv.inverses.items()}}
    if rank == 0:
        full = estimate_curvature(make(), [b for p in loaders for b in p], progress=False, group=None, **opts)
        out["total"] = sum(_inverse_bytes(v) for v in full.inverses.values())
        out["max_block"] = max(_inverse_bytes(v) // v.shape[0] for v in full.inverses.values())
    return out


def _conditioning(rank, world, loaders, **opts):
    """kappa / refined of a sharded curvature and this rank's inverses; rank 0: the single-process curvature."""
    curv = estimate_curvature(_small(), loaders[rank], progress=False, **opts)
    out = {"kappa": curv.kappa, "refined": curv.refined, "inverses": dict(curv.inverses),
           "range": {n: curv.shard.plan.range(n) for n in curv.inverses}}
    if rank == 0:
        ref = estimate_curvature(_small(), [b for p in loaders for b in p], progress=False, group=None, **opts)
        out.update(ref_kappa=ref.kappa, ref_refined=ref.refined, ref_grads=ref.grads, damp=ref.damp)
    return out


def _two_phase(rank, world, loaders, **opts):
    """estimate_curvature once, prune_with at two sparsities (layerwise override)."""
    curv = estimate_curvature(_mlp(), loaders[rank], progress=False, **opts)
    out = {}
    for sparsity in (0.5, 0.9):
        model = _mlp()
        out[sparsity] = prune_with(model, curv, sparsity, mode="layerwise", min_density=0.05).masks
        if rank == 0:
            ref_curv = estimate_curvature(_mlp(), [b for p in loaders for b in p], progress=False, group=None, **opts)
            out[f"ref{sparsity}"] = prune_with(_mlp(), ref_curv, sparsity, mode="layerwise", min_density=0.05).masks
    return out




def _ties(rank, world):
    """select_sharded on integer scores (many exact ties) split unevenly across ranks."""
    g = torch.Generator().manual_seed(7)
    shapes = [(11, 13), (40,), (5, 3, 3)]
    scores = {f"w{i}": torch.randint(-4, 5, s, generator=g).double() for i, s in enumerate(shapes)}
    out = {}
    for mode, sparsity, floor in (("global", 0.6, 0.0), ("global", 0.3, 0.25), ("layerwise", 0.7, 0.1)):
        ref = select_masks(scores, sparsity, mode, floor)
        parts, index = [], []
        for s in scores.values():
            cuts = torch.linspace(0, s.numel(), world + 2).long()[1:-1].tolist()  # uneven: last rank gets more
            bounds = [0] + cuts[:world - 1] + [s.numel()]
            lo, hi = bounds[rank], bounds[rank + 1]
            parts.append(s.flatten()[lo:hi])
            index.append(torch.arange(lo, hi))
        got = select_sharded(parts, index, [s.numel() for s in scores.values()], sparsity, mode, floor,
                             dist.group.WORLD)
        out[(mode, sparsity, floor)] = (got, [r.flatten()[i] for r, i in zip(ref.values(), index)])
    return out


def _failure(rank, world, loaders):
    """Rank 1's data holds a NaN: every rank must raise, and every model must be unchanged."""
    model = _mlp()
    before = _weights(model)
    bad = [(x.clone(), y) for x, y in loaders[rank]]
    if rank == 1:
        bad[0][0][0, 0] = float("nan")
    try:
        prune_one_shot(model, bad, sparsity=0.5, num_grads=16, block_size=64, progress=False)
        error = None
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        error = (type(exc).__name__, str(exc))
    return {"error": error, "unchanged": all(torch.equal(before[k], v) for k, v in _weights(model).items())}
















def run_suite(rank, world, port, out_dir, scenarios, backend="gloo"):
    import _dist_cases as cases  # the scenarios of test_distributed_calls (it imports this module)

    warnings.simplefilter("ignore")
    _init(rank, world, port, timeout=120, backend=backend)
    try:
        mnist = _loaders(world, 16, (1, 28, 28), 10, 8)
        cifar = _loaders(world, 4, (3, 32, 32), 10, 4, seed=1)
        small = _loaders(world, 8, (12,), 4, 4, seed=2)
        runs = {
            "mlp_global": lambda: _compare("mlp", rank, world, _mlp, mnist, sparsity=0.7, num_grads=16 * world,
                                           block_size=50, damp=1e-4),
            "mlp_layerwise": lambda: _compare("mlp", rank, world, _mlp, mnist, sparsity=0.8, num_grads=16 * world,
                                              block_size=33, mode="layerwise", min_density=0.1, damp="auto"),
            "mlp_joint": lambda: _compare("mlp", rank, world, _mlp, mnist, sparsity=0.7, num_grads=16 * world,
                                          block_size=50, damp=1e-4, joint_update=True),
            "mlp_whole_layers": lambda: _compare("mlp", rank, world, _mlp, mnist, sparsity=0.6,
                                                 num_grads=16 * world, damp=1e-4, block_size=None),
            "mlp_woodtaylor": lambda: _compare("mlp", rank, world, _mlp, mnist, sparsity=0.6, num_grads=16 * world,
                                               block_size=50, damp=1e-2, woodtaylor=True),
            # each of the 2 steps takes num_grads / 2 = 8 per rank: the whole of each rank's part
            "mlp_two_steps_diag": lambda: _compare("mlp", rank, world, _mlp, _loaders(world, 8, (1, 28, 28), 10, 8),
                                                   sparsity=0.8, num_grads=16 * world, method="diag_fisher",
                                                   num_steps=2),
            "r20": lambda: _compare("r20", rank, world, _r20, cifar, sparsity=0.6, num_grads=4 * world,
                                    block_size=64, damp=1e-4),
            "ddp": lambda: _compare("ddp", rank, world, _mlp, mnist, wrap=nn.parallel.DistributedDataParallel,
                                    sparsity=0.7, num_grads=16 * world, block_size=50, damp=1e-4),
            "fsdp": lambda: _compare("fsdp", rank, world, _mlp, mnist, wrap=_fsdp, sparsity=0.7,
                                     num_grads=16 * world, block_size=50, damp=1e-4),
            "empty_shard": lambda: _compare("small", rank, world, _small, small, sparsity=0.5,
                                            num_grads=8 * world, damp=1e-3, block_size=None),
            "memory_r20": lambda: _memory(rank, world, _r20, cifar, num_grads=4 * world, block_size=100, damp=1e-4),
            "memory_mlp": lambda: _memory(rank, world, _mlp, mnist, num_grads=16 * world, damp=1e-4),
            "memory_small": lambda: _memory(rank, world, _small, small, num_grads=8 * world, damp=1e-3,
                                            block_size=None),
            # inputs x100 at damp 0.1: some blocks beyond eps32 kappa > 1e-3 (recomputed), some not; x1: none
            "cond_ill": lambda: _conditioning(rank, world, [[(x * 100, y) for x, y in p] for p in small],
                                              num_grads=8 * world, block_size=4, damp=0.1),
            "cond_well": lambda: _conditioning(rank, world, small, num_grads=8 * world, block_size=4, damp=1e-1),
            "cond_lowrank": lambda: _conditioning(rank, world, [[(x * 100, y) for x, y in p] for p in small],
                                                  num_grads=8 * world, block_size=24, damp=1e-5),
            "two_phase": lambda: _two_phase(rank, world, mnist, num_grads=16 * world, block_size=40, damp=1e-4),
            "ties": lambda: _ties(rank, world),
            "nm": lambda: _compare("small", rank, world, _small, small, pattern="2:4", num_grads=8 * world,
                                   block_size=12, damp=1e-3),
            "rows": lambda: _compare("small", rank, world, _small, small, pattern="rows", sparsity=0.5,
                                     num_grads=8 * world, block_size=None, damp=1e-3, min_density=0.2),
            "rows_layerwise": lambda: _compare("small", rank, world, _small, small, pattern="rows", sparsity=0.4,
                                               mode="layerwise", num_grads=8 * world, damp=1e-3),
            "with_damp": lambda: cases._with_damp(rank, world, mnist, num_grads=16 * world, block_size=50),
            "with_damp_lowrank": lambda: cases._with_damp(rank, world, mnist, num_grads=16 * world, block_size=50,
                                                    inverse_form="lowrank"),
            "failure": lambda: _failure(rank, world, mnist),
            "refused": lambda: cases._refused(rank, world, small),
            "non_member": lambda: cases._non_member(rank, world, small),
            "progress": lambda: cases._progress(rank, world, small),
            "same_samples": lambda: cases._same_samples(rank, world, small),
            "estimate_memory": lambda: cases._estimate_memory(rank, world, small),
            "search_damp": lambda: cases._search(rank, world, small, _loaders(world, 8, (12,), 4, 4, seed=5)),
        }
        for name in scenarios:
            start = time.perf_counter()
            try:
                result = runs[name]()
            except Exception:  # noqa: BLE001 - the test reports it
                result = {"crash": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - start
            torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fsdp(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)


def run_dying(rank, world, port, out_dir):
    """Rank 1 dies in the middle of gradient collection; rank 0 must get an error, not hang."""
    warnings.simplefilter("ignore")
    _init(rank, world, port, timeout=20)
    loaders = _loaders(world, 16, (1, 28, 28), 10, 8)

    class Dies:
        def __iter__(self):
            yield loaders[rank][0]
            os._exit(3)

    loader = Dies() if rank == 1 else loaders[rank]
    try:
        prune_one_shot(_mlp(), loader, sparsity=0.5, num_grads=16 * world, block_size=64, progress=False)
        error = None
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        error = (type(exc).__name__, str(exc)[:500])
    torch.save({"error": error}, os.path.join(out_dir, f"dying.rank{rank}.pt"))


def run_cli(rank, world, port, out_dir, checkpoint):
    """``woodfisher prune`` as torchrun starts it: the environment variables, then the command."""
    warnings.simplefilter("ignore")
    from woodfisher.cli import main

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = main(["prune", "--model", "digits_mlp", "--checkpoint", checkpoint, "--num-grads", "64",
                 "--block-size", "50", "--sparsity", "0.8", "--no-progress", "--out", out_dir])
    torch.save({"code": code, "initialised_after": dist.is_initialized()}, os.path.join(out_dir, f"cli.rank{rank}.pt"))

