"""Phase one with streamed gradients (plan "stream"): dense inverses updated k gradients at a time.

Chosen by :func:`woodfisher.plan.plan_memory` when ``memory_budget`` cannot hold the
gradients (or forced with ``inverse_form="stream"``). Gradients are discarded after each
update, so the conditioning check of the in-memory path
(:func:`woodfisher.conditioning.refine_dense`, which needs them) is done in two steps:

- while streaming, the Frobenius bound of every block is summed chunk by chunk:
  ``kappa <= U = (1 + 1e-3) ||G||_F^2 / (N damp)`` (:func:`woodfisher_kernels.condition_estimate`
  with ``upper=True`` is linear in ``||G_chunk||_F^2``, so the chunks' values add up to the
  whole layer's; one read of each chunk, ~1/c of the update's ``4 m c^2`` flops per block);
- ``damp`` fixed (float32 Woodbury updates, paper Eq. 2): blocks with ``eps32 U <= 1e-3`` are
  certified (their float32 inverse meets :func:`woodfisher_kernels.error_bound` at < 3 digits lost),
  and such a layer's ``kappa`` is recorded as that upper bound. The other blocks need their
  gradients back: when the loader can be read again, a second pass keeps only the gradients of
  those blocks (``flagged * m * c`` entries) and checks they are the same gradients (their
  Frobenius sums must match the first pass's to 1e-4); then the in-memory step runs on them
  (estimates, float64 recompute), with the in-memory path's ``kappa`` / ``refined``. When the
  loader is single-pass, gives other gradients (shuffled), or the kept gradients would not fit
  ``memory_budget``, the float32 inverses stay, ``kappa`` records the bound ``U`` and
  :func:`woodfisher.conditioning.warn_ill_conditioned` names the layers: an inverse whose Gram
  matrix was discarded cannot be recomputed, and estimating kappa from the float32 inverse itself
  is no better (its smallest eigenvalue, ``1 / (damp (1 + kappa))``, may be off by
  ``8 eps32 (1 + kappa)^2`` relative: more than itself at the level). A layer whose float32 update
  is refused outright (kappa beyond ~1e6: the running inverse holds no correct digit) stops being
  updated and is rebuilt from all its gradients in the second pass as in memory
  (:func:`woodfisher.conditioning.layer_inverse`), or its ValueError is raised when no pass can be made;
- ``damp="auto"`` (float64 Gram blocks ``G^T G`` summed, inverted once lambda is known, by
  Cholesky): every block is built in float64, so each meets the float64 bound; kappa is
  ``lambda_max(G^T G / N) / damp`` from ``eigvalsh`` of the kept Gram block (exact, where the
  in-memory path has a power-iteration estimate within ~10%), on the blocks ``U`` does not certify
  and the largest, and the blocks beyond the level count as ``refined`` (what memory recomputes).
"""
from __future__ import annotations

import time

import torch

import woodfisher_kernels as wk

from .batches import is_single_pass
from .conditioning import EPS32, WARN_LEVEL, layer_inverse, refine_dense, uncertified
from .damping import FisherStats, resolve_damp
from .progress import phase

__all__ = ["estimate_streamed"]

#: the second pass must reproduce the first pass's Frobenius sums to this relative tolerance
SAME_GRADIENTS_RTOL = 1e-4


def estimate_streamed(collector, targets, config, curv, k: int) -> None:
    """Fill ``curv``: gradients k at a time into Woodbury updates of dense inverses, or Gram blocks when
    damp is "auto"; then the conditioning check of the module doc (``curv.kappa``, ``curv.refined``)."""
    t0 = time.perf_counter()
    m, auto = config.num_grads, config.damp == "auto"
    dtype = collector.dtype
    check = dtype == torch.float32
    curv.stats = FisherStats.live(curv.keep)
    if not auto:
        curv.damp = resolve_damp(config.damp, curv.stats)
    acc, frob, failed = {}, {}, {}
    for target in targets:  # Gram blocks in float64: their rounding would be amplified by cond(F) when inverted
        eye = torch.eye(target.block_size, dtype=torch.float64 if auto else dtype, device=target.param.device)
        acc[target.name] = (
            (torch.zeros_like(eye) if auto else eye.div(curv.damp)).expand(target.num_blocks, -1, -1).contiguous()
        )
    # the display's line spans both (the updates run between chunks); timings["gradients"] counts the gradients only
    collector.desc = "Fisher gradients + Gram sums" if auto else "Fisher gradients + inverse updates"
    chunks, collecting = collector.chunks(k), 0.0
    while True:
        t1 = time.perf_counter()   # time spent computing the gradients (the rest of the loop updates inverses)
        chunk = next(chunks, None)
        collecting += time.perf_counter() - t1
        if chunk is None:
            break
        for target in targets:
            blocks = target.grad_blocks(chunk[target.name])
            if check:  # (1 + 1e-3) ||G_chunk||_F^2 per block (the bound at N = damp = 1, summed over chunks)
                part = wk.condition_estimate(blocks, 1.0, 1.0, upper=True)
                frob[target.name] = part if target.name not in frob else frob[target.name] + part
            if auto:  # G^T G of the chunk, summed
                blocks = blocks.double()
                acc[target.name].baddbmm_(blocks.transpose(1, 2), blocks)
            elif target.name not in failed:
                try:
                    wk.woodbury_update_(acc[target.name], blocks, m, backend=config.backend, check_finite=False)
                except ValueError as err:
                    error = ValueError(f"layer {target.name!r}, damp={curv.damp:.3g}: {err}")
                    error.__cause__ = err
                    if not check:
                        raise error from err
                    failed[target.name] = error   # rebuilt from a second pass, or raised (_conditioning)
            del blocks
        chunk = None   # released before the next chunk is computed (the memory plan counts one chunk)
    curv.stats.sum_sq, curv.stats.count = collector.sum_sq, collector.count
    if auto:
        curv.damp = resolve_damp("auto", curv.stats)
    upper = {name: f.cpu() / (m * curv.damp) for name, f in frob.items()}   # (B,) bounds of kappa
    if auto:
        with phase("inverses", total=len(targets), unit="weight") as bar:
            for target in targets:
                gram = acc.pop(target.name).div_(m)
                if check and target.num_blocks:
                    _record(curv, target.name, *_gram_conditioning(gram, curv.damp, upper[target.name]))
                gram.diagonal(dim1=1, dim2=2).add_(curv.damp)
                acc[target.name] = torch.cholesky_inverse(torch.linalg.cholesky(gram)).to(dtype)
                del gram
                bar.update(1)
    curv.inverses = acc
    curv.forms = {target.name: "stream" for target in targets}
    curv.timings["gradients"] += collecting
    curv.timings["inverse"] += time.perf_counter() - t0 - collecting
    if check and not auto:
        _conditioning(collector, targets, config, curv, upper, k, failed)


def _record(curv, name: str, kappa, fixed: int) -> None:
    if kappa is not None:
        curv.kappa[name] = kappa
    if fixed:
        curv.refined[name] = fixed


def _gram_conditioning(gram: torch.Tensor, damp: float, upper: torch.Tensor):
    """(largest kappa among blocks below the level or None, blocks beyond it) of float64-built blocks.

    ``gram``: (B, c, c) float64 ``G^T G / N``; ``upper``: (B,) Frobenius bounds of kappa. The blocks
    they do not certify and the largest (:func:`woodfisher.conditioning.uncertified`, as in memory)
    get ``lambda_max`` from ``eigvalsh`` of their Gram block (exact; the Gram is at hand here).
    """
    idx = uncertified(upper)
    kappa = torch.zeros_like(upper)
    kappa[idx] = torch.linalg.eigvalsh(gram[idx.to(gram.device)])[:, -1].cpu().clamp_min(0.0) / damp
    beyond = EPS32 * kappa > WARN_LEVEL   # built in float64 anyway: what the in-memory path recomputes
    left = kappa[~beyond]
    return (float(left.max()) if left.numel() else None), int(beyond.sum())


def _conditioning(collector, targets, config, curv, upper, k: int, failed) -> None:
    """Certify by the bound, else a second pass over the loader for the flagged blocks (module doc).

    ``failed``: {name: ValueError} of layers whose float32 update was refused (kappa beyond ~1e6):
    every block of theirs is read again and the layer built as in memory
    (:func:`woodfisher.conditioning.layer_inverse`), or the error is raised when it cannot be.
    """
    flagged = {}
    for target in targets:
        u = upper[target.name]
        idx = (EPS32 * u > WARN_LEVEL).nonzero().squeeze(1)
        if target.name in failed:
            flagged[target.name] = torch.arange(u.numel())
        elif idx.numel():
            flagged[target.name] = idx
        elif u.numel():
            curv.kappa[target.name] = float(u.max())   # an upper bound, below the level
    if not flagged:
        return
    by_name = {target.name: target for target in targets}
    m, itemsize = config.num_grads, torch.empty((), dtype=collector.dtype).element_size()
    need = sum(idx.numel() * m * by_name[n].block_size * itemsize for n, idx in flagged.items())
    held = sum(v.numel() * v.element_size() for v in curv.inverses.values())
    grads = None
    if not is_single_pass(collector.loader) and (config.memory_budget is None
                                                 or held + need <= config.memory_budget):
        t0 = time.perf_counter()
        grads = _second_pass(collector, by_name, flagged, upper, curv.damp, k)
        curv.timings["gradients"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, idx in flagged.items():
        if name in failed and grads is None:
            raise failed[name]
        if name in failed:   # the whole layer, as in memory
            curv.inverses[name], left, fixed = layer_inverse(name, grads[name], curv.damp, m, "sequential", None,
                                                             config.backend)
            _record(curv, name, left, fixed)
            continue
        if grads is None:   # not recomputable: the bound is recorded and warned about
            curv.kappa[name] = float(upper[name][idx].max())
            continue
        inv = curv.inverses[name][idx.to(curv.inverses[name].device)]
        left, fixed = refine_dense(grads[name], inv, curv.damp, m, upper=upper[name][idx])
        curv.inverses[name][idx.to(inv.device)] = inv
        if left is None and idx.numel() < upper[name].numel():
            left = 0.0   # as in memory: the certified blocks count as 0
        _record(curv, name, left, fixed)
    curv.timings["inverse"] += time.perf_counter() - t0


def _second_pass(collector, by_name, flagged, upper, damp: float, k: int):
    """{name: (flagged blocks, m, c)} gradients read again, or None when the loader gave other gradients.
    Only the flagged layers' per-sample gradients are formed (the collector's targets narrowed for the pass)."""
    saved = (collector.count, collector.samples, collector.sum_sq, collector.loss_grad, collector.want_loss_grad,
             collector.desc, collector.targets)
    collector.want_loss_grad, collector.desc = False, "Fisher gradients again (ill-conditioned blocks)"
    collector.targets = [target for target in collector.targets if target.name in flagged]
    kept = {name: [] for name in flagged}
    try:
        for chunk in collector.chunks(k):
            for name, idx in flagged.items():
                blocks = by_name[name].grad_blocks(chunk[name])
                kept[name].append(blocks[idx.to(blocks.device)])
                del blocks
            del chunk   # released before the next chunk is computed
    except ValueError:  # the loader ran out (or failed) this time: the first pass's inverses stand
        return None
    finally:
        (collector.count, collector.samples, collector.sum_sq, collector.loss_grad, collector.want_loss_grad,
         collector.desc, collector.targets) = saved
    grads = {name: torch.cat(parts, dim=1) for name, parts in kept.items()}
    for name, g in grads.items():   # the same gradients? (a shuffling loader gives others)
        if g.shape[1] != collector.count:
            return None
        again = wk.condition_estimate(g, damp, collector.count, upper=True).cpu()
        if not torch.allclose(again, upper[name][flagged[name]], rtol=SAME_GRADIENTS_RTOL, atol=0.0):
            return None
    return grads
