"""One-shot pruning: WoodFisher (OBS with the blockwise inverse empirical Fisher) and baselines.

Flow of one step (``num_steps`` steps raise the sparsity linearly from the current
sparsity of the pruned layers to the target, recomputing gradients and inverses):

1. gradients of the prunable weights (:mod:`woodfisher.fisher`), already-pruned
   entries masked;
2. blockwise inverses ``(damp I + G^T G / N)^-1`` per layer through the public ops of
   :mod:`woodfisher_kernels` only: kept gradients -> ``blockwise_inverse`` (sequential
   or low-rank form by ``choose_form``), or, when ``memory_budget`` cannot hold the
   gradients, streamed k at a time into dense inverses with ``woodbury_update_``;
3. statistic ``rho`` (``obs_saliency``; WoodTaylor with the mean loss gradient), divided
   by ``flops_per_param ** beta``; masks by :func:`woodfisher.masks.select_masks`
   (joint = "global", independent = "layerwise") or by a group pattern;
4. OBS update (``obs_update``: ``v_q = w_q / [F^-1]_qq`` for every pruned q at once, the
   paper's simultaneous-removal approximation), pruned entries exactly 0.

Every argument is validated before anything runs, and if anything fails later the
model's weights (and prune masks) are restored, so a refused call changes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

import woodfisher_kernels as wk

from . import structured as st
from .baselines import METHODS, magnitude_scores
from .damping import DEFAULT_DAMP, auto_damp, auto_damp_from_grads, check_damp
from .fisher import GradientCollector, split_batch
from .flops import flops_per_param
from .kfac import check_kfac_layer, kfac_step
from .layout import PrunableLayer, resolve_layers
from .masks import check_sparsity, select_kept_masks, select_masks, sparsity_of

MODES = ("global", "layerwise")
FORMS = ("auto", "sequential", "lowrank", "stream")


@dataclass
class PruneResult:
    """What :func:`prune_one_shot` did.

    Attributes:
        masks: {param_name (e.g. "fc1.weight"): bool keep-mask of the weight's shape}.
        layers: one dict per pruned layer: name, shape, numel, nnz, sparsity, and
            ``inverse`` (the Fisher form used: "sequential", "lowrank", "stream",
            "diagonal", "kfac" or None for magnitude).
        sparsity: overall fraction of zeros over the pruned layers.
        damp: the dampening used (None for magnitude baselines).
        config: the arguments of the call (callables by name).
        timings: seconds per phase: gradients, inverse, select, update, total.
    """

    masks: Dict[str, torch.Tensor]
    layers: List[dict]
    sparsity: float
    damp: Optional[float]
    config: dict
    timings: Dict[str, float] = field(default_factory=dict)


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _validate(args: dict) -> None:
    check_sparsity(args["sparsity"])
    if args["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {args['method']!r}")
    if args["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {args['mode']!r}")
    for name in ("num_grads", "fisher_batch_size", "num_steps"):
        _check_int(name, args[name])
    if args["block_size"] is not None:
        _check_int("block_size", args["block_size"])
    check_damp(args["damp"])
    beta = args["beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < float("inf"):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if args["memory_budget"] is not None:
        _check_int("memory_budget", args["memory_budget"])
    if args["loss_fn"] is not None and not callable(args["loss_fn"]):
        raise ValueError("loss_fn must be callable(outputs, targets) or None")
    if args["backend"] not in ("auto", "cuda", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'cuda', 'triton' or 'torch', got {args['backend']!r}")
    if args["inverse_form"] not in FORMS:
        raise ValueError(f"inverse_form must be one of {FORMS}, got {args['inverse_form']!r}")
    if not 0.0 <= args["min_density"] <= 1.0:
        raise ValueError(f"min_density must lie in [0, 1], got {args['min_density']}")
    parsed = st.parse_pattern(args["pattern"])
    method = args["method"]
    if args["woodtaylor"] and method not in ("woodfisher", "diag_fisher"):
        raise ValueError(f"woodtaylor=True needs method 'woodfisher' or 'diag_fisher', got {method!r}")
    if parsed is not None:
        allowed = ("woodfisher", "magnitude") if parsed[0] == "nm" else ("woodfisher",)
        if method not in allowed:
            raise ValueError(f"pattern={args['pattern']!r} works with method in {allowed}, got {method!r}")
        if args["num_steps"] != 1 or args["woodtaylor"]:
            raise ValueError("pattern needs num_steps=1 and woodtaylor=False")
        fixed = st.pattern_sparsity(parsed)
        if fixed is not None and abs(fixed - args["sparsity"]) > 1e-9 and args["sparsity"] != 0:
            raise ValueError(f"pattern {args['pattern']!r} fixes the sparsity at {fixed}; "
                             f"got sparsity={args['sparsity']}")
    needs_data = method not in ("magnitude", "global_magnitude") or args["beta"] > 0
    if needs_data and args["loader"] is None:
        raise ValueError(f"loader is required for method={method!r} (and for beta > 0)")


def layer_flops_per_param(model: nn.Module, loader, layers: List[PrunableLayer]) -> Dict[str, float]:
    """{param_name: multiply-accumulates per weight entry and sample} of the pruned layers.

    Measured by :func:`woodfisher.flops.flops_per_param` (forward hooks) on the input
    shape of the loader's first batch: 1 for a Linear on vectors, the output spatial
    size for a conv.
    """
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError("loader is empty: cannot measure FLOPs per parameter")
    x, _ = split_batch(batch)
    found = flops_per_param(model, tuple(x.shape[1:]))
    missing = [l.name for l in layers if found.get(l.param_name, 0) <= 0]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass; cannot count their FLOPs")
    return {l.param_name: float(found[l.param_name]) for l in layers}


def plan_memory(layers: List[PrunableLayer], num_grads: int, itemsize: int,
                memory_budget: Optional[int]) -> tuple:
    """("keep", None) to keep all gradients, or ("stream", k) to stream k at a time.

    Keeping costs ``m * D`` gradient entries plus each layer's cheaper inverse form;
    streaming costs the dense ``B c^2`` inverses plus a buffer of k gradients.
    """
    d = sum(l.numel for l in layers)
    m = num_grads
    grad_bytes = m * d * itemsize
    seq = sum(l.num_blocks * l.block_size ** 2 for l in layers) * itemsize
    low = sum(l.num_blocks * (m * l.block_size + m * m) for l in layers) * itemsize
    if memory_budget is None or grad_bytes + min(seq, low) <= memory_budget:
        return "keep", None
    if seq + d * itemsize <= memory_budget:
        return "stream", max(1, min(m, (memory_budget - seq) // (d * itemsize)))
    raise ValueError(f"memory_budget={memory_budget} bytes is too small: keeping the gradients needs "
                     f"{grad_bytes + min(seq, low)}, streaming needs at least {seq + d * itemsize}; "
                     "use a smaller block_size or fewer num_grads")


def _inverses(model, loader, layers, a: dict, keep_masks, timings) -> tuple:
    """Blockwise inverses {param_name: inv}, loss gradients or None, damp, forms."""
    dtype = layers[0].param.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    m = a["num_grads"]
    mode, k = plan_memory(layers, m, itemsize, a["memory_budget"])
    if a["inverse_form"] == "stream":
        mode, k = "stream", k or min(m, 32)
    kwargs = dict(loss_fn=a["loss_fn"], num_grads=m, fisher_batch_size=a["fisher_batch_size"],
                  sampled_fisher=a["sampled_fisher"], seed=a["seed"], keep_masks=keep_masks,
                  progress=a["progress"])
    collector = GradientCollector(model, loader, layers, want_loss_grad=a["woodtaylor"], **kwargs)
    backend = a["backend"]
    if a["method"] == "diag_fisher":  # c = 1: each 1x1 block is 1 / (damp + sum g^2 / N)
        sq = {l.param_name: 0.0 for l in layers}
        for chunk in collector.chunks(min(m, 256)):
            for n, g in chunk.items():
                sq[n] = sq[n] + g.square().sum(0)
        count = collector.count
        damp = a["damp"] if a["damp"] != "auto" else auto_damp(
            sum(float(v.double().sum()) for v in sq.values()), count, sum(l.numel for l in layers))
        invs = {n: (1.0 / (damp + v / count)).view(-1, 1, 1) for n, v in sq.items()}
        forms = {n: "diagonal" for n in invs}
    elif mode == "keep":
        t0 = time.perf_counter()
        grads = collector.collect()
        timings["gradients"] += time.perf_counter() - t0
        damp = auto_damp_from_grads(grads) if a["damp"] == "auto" else a["damp"]
        budget = None if a["memory_budget"] is None else a["memory_budget"] - m * itemsize * sum(
            l.numel for l in layers)
        form = "auto" if a["inverse_form"] == "auto" else a["inverse_form"]
        invs = {l.param_name: wk.blockwise_inverse(l.grad_blocks(grads[l.param_name]), damp, collector.count,
                                                   form=form, memory_budget=budget, backend=backend)
                for l in layers}
        forms = {n: "lowrank" if isinstance(v, wk.LowRankInverse) else "sequential" for n, v in invs.items()}
    else:
        if a["damp"] == "auto":  # one extra pass: the inverses start from I / damp
            scan = GradientCollector(model, loader, layers, desc="Fisher scale", **kwargs)
            sum_sq = sum(float(g.double().square().sum()) for ch in scan.chunks(k) for g in ch.values())
            damp = auto_damp(sum_sq, scan.count, sum(l.numel for l in layers))
        else:
            damp = a["damp"]
        invs = {l.param_name: torch.eye(l.block_size, dtype=dtype, device=l.param.device).div(damp)
                .expand(l.num_blocks, -1, -1).contiguous() for l in layers}
        for chunk in collector.chunks(k):
            for l in layers:
                wk.woodbury_update_(invs[l.param_name], l.grad_blocks(chunk[l.param_name]), m, backend=backend)
        forms = {l.param_name: "stream" for l in layers}
    loss_grad = None
    if a["woodtaylor"]:
        loss_grad = {l.param_name: l.blocks(collector.loss_grad[l.param_name]) for l in layers}
    return invs, loss_grad, damp, forms


def _woodfisher_step(model, loader, layers, a, target, keep_prev, fpp, parsed, timings):
    grad_before = timings["gradients"]
    t0 = time.perf_counter()
    invs, loss_grad, damp, forms = _inverses(model, loader, layers, a, keep_prev, timings)
    timings["inverse"] += time.perf_counter() - t0 - (timings["gradients"] - grad_before)
    t0 = time.perf_counter()
    w = {l.param_name: l.blocks(l.effective_weight()) for l in layers}
    lg = loss_grad or {}
    exact, backend = a["group_exact"], a["backend"]
    new = {}
    if parsed is not None:
        rows = None
        if parsed[0] == "rows":
            scores = {l.param_name: st.row_saliency(invs[l.param_name], w[l.param_name], l, exact)
                      for l in layers}
            if fpp:
                scores = {n: s / fpp[n] ** a["beta"] for n, s in scores.items()}
            rows = st.select_rows(scores, {l.param_name: l.row_length for l in layers}, target, a["mode"])
        for l in layers:
            n = l.param_name
            if parsed[0] == "nm":
                groups = st.nm_choose(invs[n], w[n], l, parsed[1], parsed[2], exact=exact)
                flags = torch.ones(groups.shape[:2], dtype=torch.bool, device=groups.device)
            else:
                groups, flags = st.rows_to_groups(l, rows[n], w[n].device)
            prune = st.groups_to_mask(groups, flags, l.block_size)
            new[n] = (l.unblock(wk.group_obs_update(invs[n], w[n], groups, flags, exact=exact))
                      if a["obs_update"] else l.unblock(w[n].masked_fill(prune, 0.0)))
            keep_prev[n] = keep_prev[n] & ~l.unblock(prune)
        timings["select"] += time.perf_counter() - t0
        return new, keep_prev, damp, forms
    scores = {}
    for l in layers:
        n = l.param_name
        scores[n] = l.unblock(wk.obs_saliency(invs[n], w[n], lg.get(n), backend=backend,
                                              check_finite=False))
    masks = select_kept_masks(scores, target, a["mode"], a["min_density"], keep_prev, fpp, a["beta"])
    timings["select"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    for l in layers:
        n = l.param_name
        if a["obs_update"]:
            upd = wk.obs_update(invs[n], w[n], ~l.blocks(masks[n]), lg.get(n), backend=backend,
                                check_finite=False)
            new[n] = l.unblock(upd)
        else:
            new[n] = l.effective_weight() * masks[n]
    timings["update"] += time.perf_counter() - t0
    return new, masks, damp, forms


def prune_one_shot(model: nn.Module, loader: Optional[Iterable], *, sparsity: float,
                   method: str = "woodfisher", mode: str = "global", loss_fn: Optional[Callable] = None,
                   block_size: Optional[int] = None, num_grads: int = 128, fisher_batch_size: int = 1,
                   damp=DEFAULT_DAMP, num_steps: int = 1, obs_update: bool = True, woodtaylor: bool = False,
                   beta: float = 0.0, modules: Optional[Iterable[str]] = None, pattern: Optional[str] = None,
                   group_exact: bool = True, memory_budget: Optional[int] = None,
                   sampled_fisher: bool = False, seed: int = 0, progress: bool = True,
                   backend: str = "auto", inverse_form: str = "auto",
                   min_density: float = 0.0) -> PruneResult:
    """Prune ``model`` in place to ``sparsity`` over the selected layers.

    Args:
        model: network with Linear / Conv weights; modified in place (pruned entries 0).
        loader: iterable of ``(inputs, targets)`` batches (may be None for magnitude).
        sparsity: target fraction of zeros over the pruned layers, in [0, 1).
        method: "woodfisher" | "magnitude" (layerwise |w|) | "global_magnitude" |
            "diag_fisher" (OBS with a diagonal Fisher; block_size ignored) | "kfac"
            (K-FAC OBS, Linear and Conv2d, whole layers, from num_grads *
            fisher_batch_size samples; see :mod:`woodfisher.kfac`).
        mode: "global" (joint) or "layerwise" (independent).
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; default cross-entropy
            (pass ``torch.nn.functional.nll_loss`` for log-probability outputs).
        block_size: Fisher block size c, or None for whole-layer blocks.
        num_grads: m, gradients in the Fisher ("fisher subsample size").
        fisher_batch_size: samples averaged per gradient ("fisher mini-batch size").
        damp: lambda > 0, or "auto" (:mod:`woodfisher.damping`).
        num_steps: > 1 raises the sparsity linearly over the steps, recomputing the
            gradients and inverses in between; pruned weights stay pruned.
        obs_update: apply the OBS weight update; False prunes by mask only (OBD-style).
        woodtaylor: include the mean loss gradient (WoodTaylor, Eqs. 21-23).
        beta: FLOPs-aware statistic ``rho / flops_per_param ** beta``.
        modules: names of the modules to prune (default all Linear / Conv weights).
        pattern: None, "N:M" (e.g. "2:4"; fixes the sparsity at 1 - N/M) or "rows".
        group_exact: exact group statistic (True) or the paper's Eq. 18 relaxation.
        memory_budget: bytes for gradients + inverses; gradients are streamed into
            the inverses when keeping them does not fit.
        sampled_fisher: labels drawn from the model's predictive distribution.
        seed: seeds the label sampling. progress: tqdm bars.
        backend: kernel backend of woodfisher_kernels.
        inverse_form: "auto" | "sequential" | "lowrank" | "stream" (force a form).
        min_density: every layer keeps at least this fraction (mask selection).
    Returns:
        :class:`PruneResult`.
    """
    args = dict(model=model, loader=loader, sparsity=sparsity, method=method, mode=mode, loss_fn=loss_fn,
                block_size=block_size, num_grads=num_grads, fisher_batch_size=fisher_batch_size, damp=damp,
                num_steps=num_steps, obs_update=obs_update, woodtaylor=woodtaylor, beta=beta, modules=modules,
                pattern=pattern, group_exact=group_exact, memory_budget=memory_budget,
                sampled_fisher=sampled_fisher, seed=seed, progress=progress, backend=backend,
                inverse_form=inverse_form, min_density=min_density)
    _validate(args)
    start = time.perf_counter()
    parsed = st.parse_pattern(pattern)
    layers = resolve_layers(model, modules, 1 if method == "diag_fisher" else block_size)
    if method == "kfac":
        for l in layers:
            check_kfac_layer(l)
    if parsed is not None:
        st.check_pattern_layers(parsed, layers)
    if method not in ("magnitude", "global_magnitude", "kfac"):  # refuse an impossible budget up front
        plan_memory(layers, num_grads, layers[0].param.element_size(), memory_budget)
    config = {k: (getattr(v, "__name__", repr(v)) if callable(v) else v)
              for k, v in args.items() if k not in ("model", "loader")}
    config["modules"] = [l.name for l in layers]
    snapshot = [(l, l.param.detach().clone(),
                 l.module.weight_mask.detach().clone() if l.reparametrised else None) for l in layers]
    timings = {"gradients": 0.0, "inverse": 0.0, "select": 0.0, "update": 0.0}
    try:
        damp_used, forms = _run(model, loader, layers, args, parsed, timings)
    except BaseException:
        with torch.no_grad():
            for l, w, mask in snapshot:
                l.param.copy_(w)
                if mask is not None:
                    l.module.weight_mask.copy_(mask)
                    setattr(l.module, "weight", l.param * l.module.weight_mask)
        raise
    masks = {l.param_name: l.keep_mask() for l in layers}
    info = []
    for l in layers:
        keep = masks[l.param_name]
        nnz = int(keep.sum())
        info.append(dict(name=l.param_name, shape=tuple(l.shape), numel=l.numel, nnz=nnz,
                         sparsity=1.0 - nnz / l.numel, inverse=forms.get(l.param_name)))
    timings["total"] = time.perf_counter() - start
    return PruneResult(masks=masks, layers=info, sparsity=sparsity_of(masks), damp=damp_used,
                       config=config, timings=timings)


def _run(model, loader, layers, a, parsed, timings):
    """All steps; returns (damp used, {param_name: inverse form})."""
    method = a["method"]
    keep = {l.param_name: l.keep_mask() for l in layers}
    s0 = sparsity_of(keep)
    steps = a["num_steps"]
    final = a["sparsity"] if parsed is None or parsed[0] != "nm" else st.pattern_sparsity(parsed)
    targets = [max(s0, s0 + (final - s0) * (i + 1) / steps) for i in range(steps)]
    fpp = layer_flops_per_param(model, loader, layers) if a["beta"] > 0 else None
    damp_used, forms = None, {}
    for target in targets:
        keep = {l.param_name: l.keep_mask() for l in layers}
        t0 = time.perf_counter()
        if method in ("magnitude", "global_magnitude"):
            scores = magnitude_scores(layers)
            if parsed is not None:
                new, keep = st.nm_magnitude(layers, parsed[1], parsed[2], keep)
            else:
                if fpp:
                    scores = {n: s / fpp[n] ** a["beta"] for n, s in scores.items()}
                mode = "layerwise" if method == "magnitude" else "global"
                masks = select_masks(scores, target, mode, a["min_density"], pruned=keep)
                keep = {n: masks[n] & keep[n] for n in masks}
                new = {l.param_name: l.effective_weight() for l in layers}
            timings["select"] += time.perf_counter() - t0
        elif method == "kfac":
            new, keep, damp_used = kfac_step(model, loader, layers, a, target, keep, fpp, timings)
            forms = {l.param_name: "kfac" for l in layers}
        else:
            new, keep, damp_used, forms = _woodfisher_step(model, loader, layers, a, target, keep, fpp,
                                                           parsed, timings)
        for l in layers:
            l.write(new[l.param_name], keep[l.param_name])
    return damp_used, forms

