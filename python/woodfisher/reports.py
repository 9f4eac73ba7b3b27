"""Reports: per-layer sparsity tables (like the paper's Table S6), JSON, plots.

A table is a list of row dicts ``{"layer", "shape", "params", "nnz", "sparsity"
(percent), "flops_dense", "flops_sparse"}`` (the FLOPs keys only when an input shape
is given); :func:`format_table` renders it as markdown with a total row.
Plots use matplotlib's Agg backend (files only, no display needed); matplotlib is optional (the
extra ``plots``): :func:`plots_available` tells, and callers skip their plots with :func:`skip_plots`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .flops import layer_flops
from .targets import resolve_targets

__all__ = ["sparsity_table", "table_totals", "format_table", "to_jsonable", "write_json",
           "plot_accuracy_vs_sparsity", "plot_layer_sparsity", "plots_available", "skip_plots"]

Row = Dict[str, Any]


def _rows_from_model(model: nn.Module, names: Optional[Sequence[str]]) -> List[Row]:
    """Rows of the weights :func:`woodfisher.resolve_targets` gives for ``names`` (None: the pruner's default
    targets, attention projections and masked weights included), their zeros counted in the effective weight."""
    rows = []
    for target in resolve_targets(model, None if names is None else list(names), arg="names"):
        w = target.effective_weight().detach()
        nnz = int(torch.count_nonzero(w))
        rows.append({"layer": target.name, "shape": tuple(w.shape), "params": w.numel(), "nnz": nnz,
                     "sparsity": 100.0 * (1.0 - nnz / max(w.numel(), 1))})
    return rows


def _rows_from_result(result: Any) -> List[Row]:
    rows = []
    for layer in result.layers:
        numel = int(layer["numel"])
        rows.append({"layer": layer["name"], "shape": tuple(layer["shape"]), "params": numel,
                     "nnz": int(layer["nnz"]), "sparsity": 100.0 * float(layer["sparsity"])})
        if layer.get("target") is not None:  # a per-weight sparsity: each weight's own target (%)
            rows[-1]["target"] = 100.0 * float(layer["target"])
    return rows


def sparsity_table(result_or_model: Any, *, model: Optional[nn.Module] = None,
                   input_shape: Optional[Sequence[int]] = None,
                   names: Optional[Sequence[str]] = None) -> List[Row]:
    """Per-layer rows: layer, shape, params, nnz, sparsity (%), the weight's target (%) of a per-weight ``sparsity``
    dict, and FLOPs when possible.

    Args:
        result_or_model: a PruneResult (uses its ``layers``) or an ``nn.Module`` (counts
            the zeros of ``names``, default the weights the pruner prunes by default: Linear / Conv and
            attention projection weights, see :func:`woodfisher.resolve_targets`; masked weights as masked).
        model: the model, for FLOPs when the first argument is a PruneResult.
        input_shape: one sample's shape; when given (and a model is known) adds
            ``flops_dense`` / ``flops_sparse`` per layer (see :mod:`woodfisher.flops`).
        names: module or parameter names or patterns to list, as ``modules=`` takes them (module case only).
    Raises:
        ValueError: ``result_or_model`` of another type, or ``names`` naming nothing prunable.
    """
    if isinstance(result_or_model, nn.Module):
        model = result_or_model
        rows = _rows_from_model(model, names)
    elif hasattr(result_or_model, "layers"):
        rows = _rows_from_result(result_or_model)
    else:
        raise ValueError("result_or_model must be a PruneResult or nn.Module, "
                         f"got {type(result_or_model).__name__}")
    if input_shape is not None and model is not None:
        by_weight = {str(s["weight"]): s for s in layer_flops(model, input_shape).values()}
        for row in rows:
            s = by_weight.get(row["layer"])
            if s is not None:  # the model's own count when it holds these zeros (exact for attention projections)
                same = int(s["nnz"]) == int(row["nnz"])
                row["flops_dense"] = int(s["flops_dense"])
                row["flops_sparse"] = int(s["flops_sparse"]) if same else round(int(row["nnz"]) * s["uses"])
    return rows


def table_totals(rows: Sequence[Row]) -> Row:
    """Totals over rows: params, nnz, overall sparsity (%) and FLOPs sums where present."""
    params = sum(int(r["params"]) for r in rows)
    nnz = sum(int(r["nnz"]) for r in rows)
    total: Row = {"layer": "total", "shape": "", "params": params, "nnz": nnz,
                  "sparsity": 100.0 * (1.0 - nnz / max(params, 1))}
    for key in ("flops_dense", "flops_sparse"):
        if rows and all(key in r for r in rows):
            total[key] = sum(int(r[key]) for r in rows)
    return total


def _fmt_int(x: int) -> str:
    return f"{int(x):,}"


def format_table(rows: Sequence[Row], title: Optional[str] = None) -> str:
    """Markdown table of ``rows`` plus a total row (readable as plain text too)."""
    if not rows:
        raise ValueError("rows is empty")
    has_flops = any("flops_dense" in r for r in rows)  # a layer without a count (an embedding): "-" in its cells
    has_target = any("target" in r for r in rows)  # per-weight targets: beside what each weight reached
    head = ["layer", "shape", "params", "nnz", "sparsity %"] + (["target %"] if has_target else [])
    if has_flops:
        head += ["FLOPs dense", "FLOPs sparse"]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in [*rows, table_totals(rows)]:
        shape = "x".join(str(s) for s in r["shape"]) if r["shape"] != "" else ""
        cells = [str(r["layer"]), shape, _fmt_int(r["params"]), _fmt_int(r["nnz"]), f"{r['sparsity']:.2f}"]
        if has_target:
            cells.append(f"{r['target']:.2f}" if "target" in r else "")
        if has_flops:
            cells += [_fmt_int(r[key]) if key in r else "-" for key in ("flops_dense", "flops_sparse")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_jsonable(obj: Any) -> Any:
    """Convert tensors / numpy / tuples / dataclasses to JSON-serialisable values.

    A dataclass instance (a :class:`woodfisher.PruneResult`, a :class:`woodfisher.PruneConfig`) becomes a dict of
    its fields (masks as nested lists of booleans); callables become their names.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if callable(obj):
        return getattr(obj, "__name__", repr(obj))
    return repr(obj)


def write_json(path: Union[str, os.PathLike], obj: Any) -> str:
    """Write ``obj`` (made JSON-serialisable) with indentation; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2)
        f.write("\n")
    return path


def plots_available() -> bool:
    """Whether matplotlib can be imported (it is optional: ``pip install matplotlib`` or the extra ``plots``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def skip_plots(names: Sequence[str]) -> None:
    """Warn that the plot files ``names`` are not written because matplotlib is missing (the other outputs are).

    Raises:
        ValueError: ``names`` is empty.
    """
    if not names:
        raise ValueError("names must list the plot files left out")
    warnings.warn(f"{', '.join(names)} not written: matplotlib is not installed (pip install matplotlib)",
                  UserWarning, stacklevel=2)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Union[str, os.PathLike]) -> str:
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


Curve = Sequence[Tuple[float, float, float]]  # (sparsity %, accuracy %, std %)


def plot_accuracy_vs_sparsity(curves: Mapping[str, Curve], path: Union[str, os.PathLike],
                              title: str = "One-shot pruning", dense_accuracy: Optional[float] = None,
                              zoom: Optional[Tuple[float, float, float, float]] = None) -> str:
    """Accuracy (%) vs sparsity (%) per method; ``curves[method] = [(sparsity, acc, std), ...]``.

    ``zoom=(x0, x1, y0, y1)`` adds a second panel showing only that window.
    """
    if not curves:
        raise ValueError("curves is empty")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4.5), dpi=120, squeeze=False)
    markers = "osD^v<>px*h"
    for ax in axes[0]:
        for i, (method, pts) in enumerate(curves.items()):
            pts = sorted(pts)
            errs = [p[2] if len(p) > 2 else 0.0 for p in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=errs if any(errs) else None,
                        marker=markers[i % len(markers)], markersize=4, capsize=2, linewidth=1.5, label=method)
        if dense_accuracy is not None:
            ax.axhline(dense_accuracy, color="gray", linestyle="--", linewidth=1,
                       label=f"dense ({dense_accuracy:.2f}%)")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_title(title)
    axes[0][0].legend(fontsize=8, loc="lower left")
    if zoom:
        axes[0][1].set_xlim(zoom[0], zoom[1])
        axes[0][1].set_ylim(zoom[2], zoom[3])
        axes[0][1].set_title("zoom")
    return _save(plt, fig, path)


def plot_layer_sparsity(tables: Mapping[str, Sequence[Row]], path: Union[str, os.PathLike],
                        title: str = "Per-layer sparsity") -> str:
    """Grouped bars of per-layer sparsity (%), one group per layer (of any table, in first-seen order), one bar per
    table (method); a layer a table does not list has no bar in its colour; rows with a ``target`` (a per-weight
    sparsity, :func:`sparsity_table`) get a black mark at it on their bar, in the legend as "target"."""
    if not tables or not all(tables.values()):
        raise ValueError("tables must be a non-empty {label: rows} mapping with non-empty rows")
    plt = _pyplot()
    layers = list(dict.fromkeys(r["layer"] for rows in tables.values() for r in rows))  # every table's, in order
    width = 0.8 / len(tables)
    extra = 2.5 if len(tables) > 1 else 1.0 if any(r.get("target") is not None for rows in tables.values()
                                                   for r in rows) else 0.0  # room for the legend on the right
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2) + extra, 4.5), dpi=120)
    targeted = False
    for i, (label, rows) in enumerate(tables.items()):
        by_layer = {r["layer"]: r["sparsity"] for r in rows}
        xs = [j + (i - (len(tables) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [by_layer.get(n, math.nan) for n in layers], width=width, label=label)  # NaN: no bar
        goals = {r["layer"]: r["target"] for r in rows if r.get("target") is not None}
        if goals:
            marks = [(x, goals[n]) for x, n in zip(xs, layers) if n in goals]
            ax.hlines([t for _, t in marks], [x - width / 2 for x, _ in marks], [x + width / 2 for x, _ in marks],
                      colors="black", linewidths=2, zorder=3, gid=f"targets-{i}", label=None if targeted else "target")
            targeted = True
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("layer (weight name without .weight)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if len(tables) > 1 or targeted:
        handles, names = ax.get_legend_handles_labels()
        if len(tables) == 1:  # one table: its name is the title; the legend says what the marks are
            handles, names = [h for h, n in zip(handles, names) if n == "target"], ["target"]
        ax.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(plt, fig, path)
