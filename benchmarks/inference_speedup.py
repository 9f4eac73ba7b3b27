"""Inference latency and throughput of a pruned model: dense vs its sparse exports, one run.

CPU: the dense pruned model (the yardstick, measured in the same run, interleaved with the
exports) against ``woodfisher.export.to_sparse`` with CSR and BSR (4 x 4) weights, for

- ``mlp``: 1024-4096-4096-1024 MLP (ReLU), all three weights pruned;
- ``transformer``: ``nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True)``, sequences of
  32 tokens; the FFN weights (linear1, linear2: 2/3 of the layer's weights) are pruned and
  exported, attention stays dense (``nn.MultiheadAttention`` reads its weights directly). In
  eval mode the dense layer runs torch's fused fast path, which a sparse weight cannot enter;
  the row ``dense, fused path off`` times the dense layer without it, to separate the two effects;
- ``resnet20``: the CIFAR ResNet-20 of ``woodfisher.models``, the 18 residual 3x3 convs pruned,
  exported with ``conv=True`` (im2col + CSR GEMM);

at 50-95% sparsity and batch sizes 1 and 64. GPU (when one with compute capability >= 8.0 is
present): float16 dense vs ``to_semi_structured`` (2:4) for the MLP and the transformer layer.

Masks are layerwise magnitude masks of the randomly initialised weights (``select_masks``):
the time of a sparse product depends on how many non-zeros there are and how they spread,
not on the criterion that chose them (WoodFisher's unstructured masks look the same to the
kernel). Timing: per configuration the dense and exported models are called in turn, each
sample a loop of calls lasting >= ``--min-sample-ms``; latency = median over samples; speed-up =
median over samples of dense time / exported time of the same round (pairs measured seconds
apart, so that the load of a shared machine cancels out).

    OMP_NUM_THREADS=2 python -m benchmarks.inference_speedup --out benchmarks/results
    python -m benchmarks.inference_speedup --device cuda --out benchmarks/results   # 2:4 on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List

import torch
from torch import nn

from benchmarks._common import device_info, pick_device, sync
from woodfisher.export import to_dense, to_semi_structured, to_sparse
from woodfisher.masks import select_masks
from woodfisher.models import RESNET20_PRUNABLE, CifarResNet, resnet20

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BATCHES = (1, 64)


def build(name: str, quick: bool):
    """(model, prunable weight names, one sample's input shape) for a benchmark model."""
    torch.manual_seed(0)
    if name == "mlp":
        width, hidden = (64, 128) if quick else (1024, 4096)
        model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                              nn.Linear(hidden, width))
        return model, ["0.weight", "2.weight", "4.weight"], (width,)
    if name == "transformer":
        d_model, heads, ffn, tokens = (32, 2, 64, 4) if quick else (512, 8, 2048, 32)
        model = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True)
        return model, ["linear1.weight", "linear2.weight"], (tokens, d_model)
    if name == "resnet20":
        model = CifarResNet(1, (4, 8, 8)) if quick else resnet20()
        residual = [f"{name}.weight" for name, module in model.named_modules()
                    if isinstance(module, nn.Conv2d) and ".conv" in name]
        assert quick or residual == RESNET20_PRUNABLE
        return model, residual, (3, 32, 32)
    raise ValueError(f"model must be mlp, transformer or resnet20, got {name!r}")


def magnitude_masks(model: nn.Module, names: List[str], sparsity: float, nm: bool = False) -> Dict[str, torch.Tensor]:
    """Layerwise magnitude keep-masks at ``sparsity`` (or 2:4: the 2 largest of every 4 in a row)."""
    weights = {name: model.get_parameter(name).detach() for name in names}
    if not nm:
        return select_masks({name: weight.abs() for name, weight in weights.items()}, sparsity, mode="layerwise")
    masks = {}
    for name, weight in weights.items():
        runs = weight.abs().reshape(weight.shape[0], -1, 4)
        keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.topk(2, dim=-1).indices, True)
        masks[name] = keep.reshape(weight.shape)
    return masks


def clock_for(device: torch.device):
    """(name, clock): the CPU time of this thread when torch computes on one CPU thread (it leaves out the
    time the process waits for a core on a shared machine), else wall-clock time."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return "thread CPU time", time.thread_time
    return "wall-clock time", time.perf_counter


def interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, samples: int,
                min_sample_s: float) -> Dict[str, Dict[str, float]]:
    """Median seconds per call of each fn by :func:`clock_for`, the fns called in turn (drift hits all alike);
    ``wall_median_s`` is the wall-clock median."""
    clock = clock_for(device)[1]
    loops = {}
    for key, fn in fns.items():                       # warm up, then size each sample's loop
        fn()
        sync(device)
        t0 = clock()
        fn()
        sync(device)
        loops[key] = max(1, min(1000, int(min_sample_s / max(clock() - t0, 1e-7))))
    times, walls = {key: [] for key in fns}, {key: [] for key in fns}
    for _ in range(samples):
        for key, fn in fns.items():
            sync(device)
            t0, wall0 = clock(), time.perf_counter()
            for _ in range(loops[key]):
                fn()
            sync(device)
            times[key].append((clock() - t0) / loops[key])
            walls[key].append((time.perf_counter() - wall0) / loops[key])
    return {key: {"median_s": statistics.median(ts), "min_s": min(ts), "samples": len(ts), "loops": loops[key],
                  "times_s": ts, "wall_median_s": statistics.median(walls[key])} for key, ts in times.items()}


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def cpu_rows(name: str, args, device) -> List[dict]:
    model, names, shape = build(name, args.quick)
    model.eval()
    formats = {"csr": {"layout": "csr"}} if name == "resnet20" else {"csr": {"layout": "csr"},
                                                                   "bsr4": {"layout": "bsr", "blocksize": 4}}
    rows = []
    for sparsity in args.sparsities:
        masks = magnitude_masks(model, names, sparsity)
        dense = to_dense(model, masks)
        exported = {key: to_sparse(model, masks, names=[name[: -len(".weight")] for name in names],
                                   conv=name == "resnet20", **kw) for key, kw in formats.items()}
        if name == "transformer":          # what the sparse layer loses by leaving the fused fast path
            exported["dense, fused path off"] = to_dense(model, masks)
            exported["dense, fused path off"].linear1.register_forward_pre_hook(lambda module, args: None)
        for batch in args.batches:
            inputs = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            with torch.inference_mode():
                ref = dense(inputs)
                errors = {key: _max_rel_err(module(inputs), ref) for key, module in exported.items()}
                fns = {"dense": lambda: dense(inputs),
                       **{key: (lambda module=module: module(inputs)) for key, module in exported.items()}}
                timed = interleaved(fns, device, args.samples, args.min_sample_ms / 1e3)
            for key in exported:
                rows.append(_row(name, sparsity, batch, key, timed["dense"], timed[key], errors[key]))
            print(_line(rows[-len(exported):]), flush=True)
    return rows


def gpu_rows(name: str, args, device) -> List[dict]:
    """float16 dense vs 2:4 semi-structured (the N:M pattern fixes the sparsity at 50%)."""
    if name == "resnet20":
        return []
    model, names, shape = build(name, args.quick)
    model.eval()
    masks = magnitude_masks(model, names, 0.5, nm=True)
    dense = to_dense(model, masks).to(device, torch.float16)
    semi = to_semi_structured(model, masks, names=[name[: -len(".weight")] for name in names], dtype=torch.float16,
                              device=device)
    rows = []
    for batch in args.batches:
        inputs = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(device, torch.float16)
        with torch.inference_mode():
            error = _max_rel_err(semi(inputs), dense(inputs))
            timed = interleaved({"dense": lambda: dense(inputs), "2:4": lambda: semi(inputs)}, device, args.samples,
                                args.min_sample_ms / 1e3)
        rows.append(_row(name, 0.5, batch, "2:4 fp16", timed["dense"], timed["2:4"], error))
        print(_line(rows[-1:]), flush=True)
    return rows


def _row(model, sparsity, batch, fmt, dense, sparse, error) -> dict:
    return {"model": model, "sparsity": sparsity, "batch": batch, "format": fmt,
            "dense_ms": dense["median_s"] * 1e3, "sparse_ms": sparse["median_s"] * 1e3,
            "speedup": statistics.median(ref / got for ref, got in zip(dense["times_s"], sparse["times_s"])),
            "dense_best_ms": dense["min_s"] * 1e3, "sparse_best_ms": sparse["min_s"] * 1e3,
            "speedup_best": dense["min_s"] / sparse["min_s"],
            "dense_per_s": batch / dense["median_s"], "sparse_per_s": batch / sparse["median_s"],
            "dense_wall_ms": dense["wall_median_s"] * 1e3, "sparse_wall_ms": sparse["wall_median_s"] * 1e3,
            "max_rel_err": error, "samples": sparse["samples"], "loops": [dense["loops"], sparse["loops"]]}


def _line(rows) -> str:
    head = rows[0]
    parts = [f"{row['format']} {row['sparse_ms']:.3f} ms ({row['speedup']:.2f}x)" for row in rows]
    return (f"{head['model']:<11} s={head['sparsity']:.2f} b={head['batch']:<3} dense {head['dense_ms']:.3f} ms | "
            + " | ".join(parts))


def markdown(result: dict) -> str:
    info = result["device"]
    lines = [f"# Inference speed-up of pruned models: {info['device_name']} ({info['device_type']})", "",
             f"torch {info['torch']}, torch threads: {info['cpu_threads']} "
             f"(OMP_NUM_THREADS={info['omp_num_threads']}), "
             f"{result['date']}.", ""] + [f"- {note}" for note in result["notes"]] + [
             "", f"Times are {result['clock']} (wall-clock medians are in the JSON). "
             "Latency = median time of one forward call at the batch size; throughput = samples/s; speed-up = "
             "median over rounds of dense time / exported time, each round timing the dense pruned model and its "
             "exports one after the other (> 1: the export is faster; bold); best-of speed-up = fastest dense "
             "sample / fastest exported sample (closest to an idle machine). `max rel err` = "
             "max |exported - dense| / max |dense| on the timed batch.", "", "## Speed-up summary", ""]
    lines += summary_table(result["rows"]) + [""]
    for model in dict.fromkeys(row["model"] for row in result["rows"]):
        rows = [row for row in result["rows"] if row["model"] == model]
        lines += [f"## {model}: {result['models'][model]}", "",
                  "| sparsity | batch | format | dense ms | exported ms | speed-up | best-of speed-up | "
                  "dense samples/s | exported samples/s | max rel err |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            lines.append(f"| {100 * row['sparsity']:.0f}% | {row['batch']} | {row['format']} | "
                         f"{row['dense_ms']:.3f} | {row['sparse_ms']:.3f} | {_speedup(row['speedup'])} | "
                         f"{row['speedup_best']:.2f}x | "
                         f"{row['dense_per_s']:.4g} | {row['sparse_per_s']:.4g} | {row['max_rel_err']:.1e} |")
        lines.append("")
    sparse_rows = [row for row in result["rows"] if not row["format"].startswith("dense")]
    slow = [row for row in sparse_rows if row["speedup"] < 1]
    lines += ["## Where sparsity does not pay", "",
              f"{len(slow)} of {len(sparse_rows)} exported configurations are slower than the dense model "
              "(sparsity/batch):", ""]
    for model in dict.fromkeys(row["model"] for row in slow):
        for fmt in dict.fromkeys(row["format"] for row in slow if row["model"] == model):
            cases = ", ".join(f"{100 * row['sparsity']:.0f}%/b{row['batch']}" for row in slow
                              if row["model"] == model and row["format"] == fmt)
            lines.append(f"- {model}, {fmt}: {cases}")
    return "\n".join(lines) + "\n"


def summary_table(rows: List[dict]) -> List[str]:
    """Speed-up (dense latency / exported latency) by model, format and batch, one column per sparsity."""
    levels = sorted(dict.fromkeys(row["sparsity"] for row in rows))
    lines = ["| model | format | batch | " + " | ".join(f"{100 * level:.0f}%" for level in levels) + " |",
             "|---|---|---:|" + "---:|" * len(levels)]
    for key in dict.fromkeys((row["model"], row["format"], row["batch"]) for row in rows):
        cells = {row["sparsity"]: row["speedup"] for row in rows if (row["model"], row["format"], row["batch"]) == key}
        lines.append("| {} | {} | {} | ".format(*key) + " | ".join(
            _speedup(cells[level]) if level in cells else "" for level in levels) + " |")
    return lines


def _speedup(value: float) -> str:
    """Bold when the export is at least as fast as the dense model."""
    return f"**{value:.2f}x**" if value >= 1 else f"{value:.2f}x"


MASKS = ("layerwise magnitude of the random initial weights (2:4 on the GPU); the speed of a sparse product "
         "depends on the number and spread of the non-zeros, not on the criterion that chose them")
MODELS = {"mlp": "1024-4096-4096-1024 MLP, all 3 weights pruned and exported",
          "transformer": "TransformerEncoderLayer(512, 8 heads, FFN 2048), 32 tokens per sample; FFN pruned and "
                         "exported (2/3 of the weights), attention dense",
          "resnet20": "CIFAR ResNet-20, the 18 residual 3x3 convs pruned and exported as im2col + CSR"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (CSR/BSR) or cuda (2:4 semi-structured); default cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--samples", type=int, default=15, help="timed samples per model and configuration")
    parser.add_argument("--min-sample-ms", type=float, default=20.0, help="each sample loops calls for this long")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--out", default=None, help="folder for inference_<device>.json / .md")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    load = os.getloadavg()
    rows = []
    for name in args.models:
        rows += gpu_rows(name, args, device) if device.type == "cuda" else cpu_rows(name, args, device)
    notes = [f"The machine was shared with other jobs while this ran (load average {load[0]:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores). "
             + ("With one torch thread the times are the thread's CPU time, which leaves out the waits for a core; "
                "caches and memory bandwidth were still shared. " if clock_for(device)[0] == "thread CPU time" else "")
             + "The transformer's control row `dense, fused path off` compares two nearly identical dense models: "
             "its spread around 1.0x shows the noise level.",
             f"Masks: {MASKS}.", "Models: " + "; ".join(f"{name}: {MODELS[name]}" for name in args.models) + "."]
    if args.quick:
        notes.insert(0, "QUICK MODE (smoke test): tiny stand-in models, not the ones named below; times mean nothing.")
    if device.type == "cpu":
        notes.append("2:4 semi-structured weights need an NVIDIA GPU (compute capability >= 8.0): "
                     "`--device cuda` there writes inference_cuda.json / .md.")
    result = {"device": device_info(device), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "notes": notes, "clock": clock_for(device)[0], "quick": args.quick,
              "models": {name: MODELS[name] for name in args.models},
              "settings": {key: getattr(args, key) for key in ("sparsities", "batches", "samples", "min_sample_ms")},
              "masks": MASKS, "rows": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"inference_{device.type}")
        with open(stem + ".json", "w") as handle:
            json.dump(result, handle, indent=1)
        with open(stem + ".md", "w") as handle:
            handle.write(markdown(result))
        print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
