"""Group OBS: N:M semi-structured patterns and whole rows / filters.

Both use the group statistic of :func:`woodfisher_kernels.group_obs_saliency` on the
blockwise inverse, exact (``rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2``) or the paper's
Eq. 18 relaxation (``group_exact=False``), and remove the chosen groups together
(:func:`group_update`): exact, all removed entries of a block as one set (the OBS optimum for
all of them, not the sum of the groups' updates); with Eq. 18, the sum of the groups' updates.

* ``pattern="N:M"`` (e.g. ``"2:4"``): in every run of M consecutive weights keep N: along
  the input features of a row for Linear / ``Conv1D``, along the input channels at each
  (out, kernel position) for a conv (its blocks are laid out (out, *kernel, in),
  :mod:`woodfisher.layout`: the layout of 2:4 sparse tensor cores). For each run all
  ``C(M, M-N)`` subsets of M-N weights are scored with the group statistic and the cheapest
  one is pruned. Needs the run length (row length; a conv's input channels per group) and
  the block size to be multiples of M, so that a run never crosses a row or a block; a
  depthwise conv (1 input channel per group) is refused, naming it.
* ``pattern="rows"``: remove whole output rows (Linear) / filters (Conv) as groups.
  Needs whole-layer blocks or a block size that is a multiple of the row length.
  Exact statistics solve one ``q x q`` system per row (q = row length). The count follows
  unstructured pruning's rounding: at most ``round(sparsity * n)`` entries, and no row left
  unpruned would still fit (:func:`select_rows`).
"""
from __future__ import annotations

import itertools
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import woodfisher_kernels as wk

from .diagnostics import warn_at_caller
from .masks import density_floor
from .targets import PruneTarget, resolve_targets

Pattern = Tuple  # ("nm", n, m) or ("rows",)
#: :func:`group_update`: float64 memory for the joint q x q systems of one chunk of blocks.
JOINT_BYTES = 64 * 2 ** 20


def parse_pattern(pattern) -> Optional[Pattern]:
    """None, ``"N:M"`` with 0 < N < M, or ``"rows"``; anything else is a ValueError."""
    if pattern is None:
        return None
    if pattern == "rows":
        return ("rows",)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern must be None, 'N:M' (e.g. '2:4') or 'rows', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern 'N:M' needs 0 < N < M, got {pattern!r}")
    return ("nm", n, m)


def pattern_sparsity(parsed: Pattern) -> Optional[float]:
    """The sparsity an N:M pattern fixes (1 - N/M); None for rows."""
    return 1.0 - parsed[1] / parsed[2] if parsed[0] == "nm" else None


def nm_run_length(layer: PruneTarget) -> int:
    """Entries an N:M run must fit in: the input channels (per group) of a conv weight (its runs go along them at
    each (out, kernel position)), the row length of other weights."""
    return layer.shape[1] if layer.kind == "conv" else layer.row_length


def fit_pattern(model, config):
    """``config`` itself, or, for an N:M ``pattern`` with the default targets (``modules`` None), a copy whose
    ``modules`` are the default weights the pattern fits less ``exclude`` (then None), with one warning naming those
    it leaves dense (a 3-channel stem conv, a depthwise conv: their runs of M input channels do not exist). Explicit
    ``modules``
    and the other patterns are checked as they are (:func:`check_pattern_layers`).

    Args:
        model: the network. config: a :class:`woodfisher.PruneConfig`.
    Returns:
        a :class:`woodfisher.PruneConfig`.
    """
    parsed = parse_pattern(config.pattern)
    if parsed is None or parsed[0] != "nm" or config.modules is not None:
        return config
    targets = resolve_targets(model, None, exclude=config.exclude)
    unfit = [target for target in targets if nm_run_length(target) % parsed[2]]
    if not unfit or len(unfit) == len(targets):  # every weight fits, or none does (check_pattern_layers says why)
        return config
    shown = ", ".join(f"{target.name!r} ({nm_run_length(target)} "
                      f"{'input channels per group' if target.kind == 'conv' else 'entries per row'})"
                      for target in unfit[:4]) + (f" and {len(unfit) - 4} more" if len(unfit) > 4 else "")
    warn_at_caller(f"pattern '{config.pattern}': {len(unfit)} of the {len(targets)} weights pruned by default are "
                   f"left dense: {shown}; N:M needs a multiple of {parsed[2]} input channels per group (conv) or "
                   f"entries per row (Linear); pass modules= to choose the weights yourself")
    left = {target.name for target in unfit}
    return config.replace(modules=tuple(target.name for target in targets if target.name not in left), exclude=None)


def check_pattern_layers(parsed: Pattern, layers: List[PruneTarget]) -> None:
    """Refuse layers whose rows / input channels / blocks do not fit the pattern (naming the layer)."""
    if parsed[0] == "nm":
        n, m = parsed[1], parsed[2]
        transposed = [layer.name for layer in layers
                      if isinstance(getattr(layer, "module", None), nn.modules.conv._ConvTransposeNd)]
        if transposed:  # (in, out, *kernel): runs along dim 1 would be output channels, not the reduction
            raise ValueError(f"pattern '{n}:{m}': {transposed} are transposed-convolution weights, (in, out, *kernel), "
                             "whose sums run over their input channels (dim 0); N:M runs are laid out along dim 1 of "
                             "conv weights, here the output channels, which 2:4 sparse tensor cores cannot use; leave "
                             "them out of modules= (they are not pruned by default) or prune them without a pattern")
        # first the order: re-estimating with the pattern also leaves the default weights it does not fit dense
        order = next((layer for layer in layers if layer.kind == "conv" and not layer.channels_last), None)
        if order is not None:
            raise ValueError(f"pattern '{n}:{m}': the Fisher blocks of conv weight {order.name!r} were built in "
                             "(out, in, *kernel) order, by a curvature estimated without an N:M pattern, and its N:M "
                             "runs go along the input channels; estimate the curvature with "
                             f"pattern='{n}:{m}' (estimate_curvature(..., pattern='{n}:{m}'), "
                             f"FisherHook(..., pattern='{n}:{m}'))")
        unfit = [layer for layer in layers if nm_run_length(layer) % m]
        if unfit:
            first, fit = unfit[0], len(layers) - len(unfit)
            names = [layer.name for layer in unfit[:6]] + (["..."] if len(unfit) > 6 else [])
            hint = (f"; modules= naming the other {fit} weight(s) prunes those (for prune_with: in estimate_curvature "
                    "/ FisherHook), and the default modules leave such weights dense" if fit else "")
            what = (f"{first.shape[1]} input channels per group (N:M runs go along the input channels at each "
                    "output channel and kernel position, as 2:4 sparse tensor cores need)" if first.kind == "conv"
                    else f"rows of {first.row_length} entries")
            raise ValueError(f"pattern '{n}:{m}': layer {first.name!r} has {what}, not a multiple of {m} "
                             f"(weights that do not fit: {names}){hint}")
        block = next((layer for layer in layers if layer.block_size % m), None)
        if block is not None:
            raise ValueError(f"pattern '{n}:{m}': block_size {block.block_size} of layer {block.name!r} "
                             f"must be a multiple of {m}")
        return
    for layer in layers:
        if layer.block_size % layer.row_length:
            raise ValueError(f"pattern 'rows': block_size {layer.block_size} of layer {layer.name!r} "
                             f"must be a multiple of its row length {layer.row_length} (or None); for prune_with, "
                             "estimate the curvature with pattern='rows' (estimate_curvature(..., pattern='rows'), "
                             "whose block_size='auto' follows the rows)")


def consecutive_groups(layer: PruneTarget, size: int, device=None) -> torch.Tensor:
    """(B, c // size, size) int64 indices of the runs of ``size`` entries of every block."""
    c = layer.block_size
    idx = torch.arange(c, device=device).view(c // size, size)
    return idx.unsqueeze(0).expand(layer.num_blocks, -1, -1).contiguous()


def nm_choose(inv, weights: torch.Tensor, layer: PruneTarget, n: int, m: int, *,
              exact: bool = True, magnitude: bool = False) -> torch.Tensor:
    """For every run of m weights, the m-n entries to prune: (B, c // m, m - n) indices.

    The subset minimising the group statistic among all ``C(m, m - n)`` subsets, or
    with ``magnitude=True`` the m-n smallest ``|w|``.
    """
    runs = consecutive_groups(layer, m, weights.device)                   # (B, G, m)
    q = m - n
    if magnitude:
        w_runs = torch.gather(weights.abs(), 1, runs.flatten(1)).view(runs.shape)
        order = torch.argsort(w_runs, dim=2, stable=True)[..., :q]
        return torch.gather(runs, 2, order)
    subsets = torch.tensor(list(itertools.combinations(range(m), q)), device=weights.device)  # (S, q)
    b, g, _ = runs.shape
    cand = runs[:, :, subsets]                                            # (B, G, S, q)
    rho = wk.group_obs_saliency(inv, weights, cand.reshape(b, -1, q), exact=exact)
    best = rho.view(b, g, -1).argmin(dim=2)                               # (B, G)
    return torch.gather(cand, 2, best.view(b, g, 1, 1).expand(b, g, 1, q)).squeeze(2)


def groups_to_mask(groups: torch.Tensor, prune: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, G, q) groups and (B, G) flags -> (B, c) bool prune mask."""
    mask = torch.zeros(groups.shape[0], block_size, dtype=torch.bool, device=groups.device)
    mask.scatter_(1, groups.flatten(1), prune.unsqueeze(-1).expand(groups.shape).flatten(1))
    return mask


def group_update(inv, weights: torch.Tensor, groups: torch.Tensor, flags: torch.Tensor, block_size: int,
                 exact: bool = True) -> torch.Tensor:
    """New blocked weights (B, c) after removing the groups of ``groups`` (B, G, q) where ``flags`` (B, G).

    ``exact=True``: the removed entries of each block form one set Q (all its removed groups at once) and
    ``dw = -F^-1 E_Q ([F^-1]_QQ)^-1 w_Q``, the minimum of the quadratic model under every constraint
    ``(w + dw)_Q = 0`` (WoodFisher paper Sec. 4.2, Eqs. 12-17, for |Q| weights). Summing each group's own
    update instead (:func:`woodfisher_kernels.group_obs_update` per group) ignores the coupling between the
    groups of a block: on a 2:4 test layer it raised the quadratic model's loss by 15% over this optimum,
    on the same mask. Blocks are batched by their number of removed entries. ``exact=False``: the paper's
    Eq. 18 relaxation, one combined constraint per group, the groups' updates summed (Sec. 6.1).
    Entries removed are exactly 0 afterwards.
    """
    if not exact:
        return wk.group_obs_update(inv, weights, groups, flags, exact=False)
    prune = groups_to_mask(groups, flags, block_size)
    counts = prune.sum(1)
    new = weights.clone()
    for q in counts.unique().tolist():
        if q == 0:  # nothing removed in these blocks: unchanged
            continue
        same = (counts == q).nonzero().squeeze(1)
        step = max(1, JOINT_BYTES // (8 * q * q))  # the q x q systems (float64) of a chunk of blocks
        for start in range(0, same.numel(), step):
            idx = same[start:start + step]
            every = idx.numel() == prune.shape[0]
            part = inv if every else (inv.select(idx) if isinstance(inv, wk.LowRankInverse) else inv[idx])
            joint = prune[idx].nonzero()[:, 1].view(idx.numel(), 1, q)
            ones = torch.ones(idx.numel(), 1, dtype=torch.bool, device=weights.device)
            new[idx] = wk.group_obs_update(part, weights[idx], joint, ones, exact=True)
    return new


def joint_update(inv, weights: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """Unstructured joint OBS update: new blocked weights (B, c) removing every entry where ``prune`` (B, c) bool.

    Each block's pruned set Q is one group of :func:`group_update` (``exact=True``): ``dw = -F^-1 E_Q
    ([F^-1]_QQ)^-1 w_Q`` (WoodFisher paper Sec. 4.2, Eqs. 12-17, for |Q| weights), the optimum of the
    quadratic model under all the constraints ``(w + dw)_Q = 0`` of the block, where the paper's update
    (:func:`woodfisher_kernels.obs_update`) sums the single-weight ones (Eq. 10). ``inv``: (B, c, c) or a
    :class:`woodfisher_kernels.LowRankInverse` (q > m solved through the m x m Woodbury system).
    Pruned entries are exactly 0 afterwards. Raises what :func:`group_update` raises.
    """
    b, c = weights.shape
    singles = torch.arange(c, device=weights.device).view(1, c, 1).expand(b, c, 1)   # every entry a group of 1
    return group_update(inv, weights, singles, prune, c, exact=True)


def row_saliency(inv, weights: torch.Tensor, layer: PruneTarget, exact: bool = True) -> torch.Tensor:
    """Group statistic of every output row / filter: (B, c // row) -> rows (out,)."""
    groups = consecutive_groups(layer, layer.row_length, weights.device)
    rho = wk.group_obs_saliency(inv, weights, groups, exact=exact)
    return rho.flatten()[: layer.out_features]


def select_rows(scores: Dict[str, torch.Tensor], sizes: Dict[str, int], sparsity: float,
                mode: str, min_density: float = 0.0) -> Dict[str, torch.Tensor]:
    """{name: (out,) bool rows to prune}: as many pruned entries as ``sparsity`` allows, never more.

    The target is unstructured pruning's (:func:`woodfisher.masks.select_masks`): ``round(sparsity * n)``
    entries, n the entries of each weight (layerwise) or of all the weights (global). Rows are ranked cheapest
    first, by the group statistic ``rho_Q`` within a weight (layerwise) or by the statistic per entry
    ``rho_Q / |Q|`` across weights (global), and taken in that order; a row that would take the pruned entries
    beyond the target is skipped and the ranking goes on, so when it ends no row left fits in what remains of
    the target. Layerwise (equal rows) that is the ``round(sparsity * out * row) // row`` cheapest rows. Every
    weight keeps its ``ceil(min_density * out)`` most salient rows (its rows are of one size, so that is at least
    ``min_density`` of its entries): the floor against layer collapse; they are never candidates.

    Args:
        scores: {name: (out,) group statistic of every row} (smaller: cheaper to remove).
        sizes: {name: entries per row}.
        sparsity: target fraction of entries, in [0, 1). mode: "layerwise" | "global".
        min_density: fraction of every weight's rows always kept, in [0, 1].
    Returns:
        {name: (out,) bool, True for the rows to prune}, on the device of the scores.
    """
    floors = {n: density_floor(min_density, s.numel()) for n, s in scores.items()}
    groups = [[n] for n in scores] if mode == "layerwise" else [list(scores)]
    out = {}
    for names in groups:
        per_entry = torch.cat([scores[n].double().cpu() / sizes[n] for n in names])
        size = [sizes[n] for n in names for _ in range(scores[n].numel())]
        protected = torch.cat([_top(scores[n].double().cpu(), floors[n]) for n in names]).tolist()
        order = [i for i in torch.argsort(per_entry, stable=True).tolist() if not protected[i]]
        flags = _cheapest_within(order, size, int(round(sparsity * sum(size))))
        start = 0
        for n in names:
            k = scores[n].numel()
            out[n] = flags[start:start + k].to(scores[n].device)
            start += k
    return out


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) bool: the ``k`` largest entries of ``score`` (ties: the later ones, as the ascending stable sort)."""
    flags = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        flags[torch.argsort(score, stable=True)[-k:]] = True
    return flags


def _cheapest_within(order: List[int], size: List[int], target: int) -> torch.Tensor:
    """(len(size),) bool: the groups of ``order`` (cheapest first) taken while they fit in ``target`` entries,
    skipping any that does not (first fit in rank order)."""
    flags = torch.zeros(len(size), dtype=torch.bool)
    room, smallest = target, min(size, default=0)
    for i in order:
        if room < smallest:
            break
        if size[i] <= room:
            flags[i] = True
            room -= size[i]
    return flags


def rows_to_groups(layer: PruneTarget, rows: torch.Tensor, device=None):
    """(out,) row flags -> ((B, G, row) groups, (B, G) flags) in block layout."""
    groups = consecutive_groups(layer, layer.row_length, device)
    flags = torch.zeros(groups.shape[0] * groups.shape[1], dtype=torch.bool, device=device)
    flags[: rows.numel()] = rows.to(device)
    return groups, flags.view(groups.shape[0], groups.shape[1])


def nm_magnitude(layers: List[PruneTarget], n: int, m: int, keep: Dict[str, torch.Tensor]):
    """N:M by |w| (no Fisher): returns ({param_name: weights}, updated keep-masks)."""
    new = {}
    for layer in layers:
        name = layer.param_name
        w = layer.blocks(layer.effective_weight())
        groups = nm_choose(None, w, layer, n, m, magnitude=True)
        flags = torch.ones(groups.shape[:2], dtype=torch.bool, device=w.device)
        prune = layer.unblock(groups_to_mask(groups, flags, layer.block_size))
        keep[name] = keep[name] & ~prune
        new[name] = layer.effective_weight() * keep[name]
    return new, keep
