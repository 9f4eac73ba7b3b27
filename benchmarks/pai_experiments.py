"""Pruning-at-initialization experiments: prune a fresh model, train it, test it.

Every (model, criterion, sparsity, warm-up, seed) run appends one row to
``<out>/pai_<model>.csv`` (runs already in the file are skipped, so the script can be
resumed); ``--plot`` redraws ``pai_<model>.png`` from the CSV. ``--collapse-only``
skips training and records the per-layer densities / collapsed layers instead
(``pai_<model>_collapse.csv``).

Full runs (GPU):  python -m benchmarks.pai_experiments --model resnet20 --device cuda \
                      --epochs 160 --batch-size 128 --augment --seeds 0 1 2
Quick CPU runs:   python -m benchmarks.pai_experiments --model mlpnet --quick
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

import torch

from woodfisher.data import evaluate, load_dataset, make_loader, subset
from woodfisher.models import MODEL_SPECS, build_model
from woodfisher.pai import CRITERIA, attach_masks, prune_at_init, train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.environ.get("WOODFISHER_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
FIELDS = ["model", "criterion", "sparsity", "warmup", "seed", "mode", "min_density", "actual_sparsity", "num_collapsed",
          "collapsed", "score_seconds", "train_steps", "train_epochs", "train_samples", "batch_size", "lr",
          "augment", "test_samples", "test_acc", "final_loss", "num_probes", "score_samples",
          "warmup_batches", "params", "device", "torch", "setting"]
QUICK = {  # scaled-down CPU settings, written into every CSV row ("setting" column)
    "mlpnet": dict(epochs=1.0, max_steps=None, train_subset=None, test_subset=None, batch_size=128, lr=0.05,
                   sparsities=[0.5, 0.8, 0.9, 0.95, 0.98, 0.99], seeds=[0, 1, 2], criteria=list(CRITERIA)),
    "resnet20": dict(epochs=1.0, max_steps=100, train_subset=None, test_subset=2000, batch_size=64, lr=0.1,
                     sparsities=[0.9, 0.95, 0.98], seeds=[0],
                     criteria=["hutchinson", "fisher", "snip", "grasp", "synflow", "magnitude", "random"]),
}


def augment_batch(x: torch.Tensor) -> torch.Tensor:
    """Random 4-pixel-padded 32x32 crop + horizontal flip, per sample ((N,C,H,W) -> same)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    i, j = torch.randint(0, 9, (2, n)).tolist()
    out = torch.stack([padded[k, :, i[k]:i[k] + h, j[k]:j[k] + w] for k in range(n)])
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


class Augmented:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield augment_batch(x), y


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mlpnet", "resnet20", "estimator"], required=True,
                   help="'estimator': only the Hutchinson-vs-exact diagonal check (error vs probes)")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true", help="scaled-down CPU settings (see QUICK)")
    p.add_argument("--criteria", nargs="+", choices=CRITERIA)
    p.add_argument("--sparsities", nargs="+", type=float)
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--warmup", choices=["both", "on", "off"], default="both",
                   help="BN warm-up; models without BatchNorm run once ('n/a')")
    p.add_argument("--mode", choices=["global", "layerwise"], default="global")
    p.add_argument("--all-layers", action="store_true", help="prune every conv/fc weight, not the model's default set")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR)")
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int)
    p.add_argument("--score-samples", type=int, default=512, help="samples used for scoring")
    p.add_argument("--score-batch-size", type=int, default=128)
    p.add_argument("--num-probes", type=int, default=8)
    p.add_argument("--warmup-batches", type=int, default=10)
    p.add_argument("--min-density", type=float, default=0.0, help="minimum kept fraction per layer")
    p.add_argument("--collapse-only", action="store_true", help="no training: record layer densities")
    p.add_argument("--plot", action="store_true", help="only redraw the plot from the CSV")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.model == "estimator":
        return a
    base = QUICK[a.model] if a.quick else dict(epochs=1.0, max_steps=None, train_subset=None, test_subset=None,
                                              batch_size=128, lr=0.1, sparsities=[0.5, 0.8, 0.9, 0.95, 0.98, 0.99],
                                              seeds=[0, 1, 2], criteria=list(CRITERIA))
    for k, v in base.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def _done(path):
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {(r["criterion"], float(r["sparsity"]), r["warmup"], int(r["seed"]), float(r.get("min_density") or 0))
                for r in csv.DictReader(f)}


def _append(path, row, fields):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def run(a):
    spec = MODEL_SPECS[a.model]
    train_set = subset(load_dataset(spec.dataset, a.data_dir, "train"), a.train_subset, seed=0)
    test_set = subset(load_dataset(spec.dataset, a.data_dir, "test"), a.test_subset, seed=0)
    has_bn = a.model == "resnet20"
    warmups = ["n/a"] if not has_bn else (["on", "off"] if a.warmup == "both" else [a.warmup])
    suffix = "_collapse" if a.collapse_only else ""
    csv_path = os.path.join(a.out, f"pai_{a.model}{suffix}.csv")
    done = _done(csv_path) if not a.collapse_only else set()
    setting = ("quick-cpu" if a.quick else "full") + f": epochs={a.epochs} max_steps={a.max_steps} bs={a.batch_size} " \
              f"train_subset={a.train_subset} test_subset={a.test_subset} score_samples={a.score_samples}"
    os.makedirs(a.out, exist_ok=True)
    fields = FIELDS if not a.collapse_only else FIELDS[:11] + ["layer", "layer_numel", "layer_density"]
    for seed in a.seeds:
        for sparsity in a.sparsities:
            for crit in a.criteria:
                for wu in warmups:
                    if wu == "off" and crit in ("magnitude", "random"):
                        continue  # scores ignore BN statistics: one run suffices
                    if (crit, sparsity, wu, seed, a.min_density) in done:
                        continue
                    row = one_run(a, spec, train_set, test_set, crit, sparsity, wu, seed, setting)
                    if a.collapse_only:
                        for layer in row.pop("layers"):
                            _append(csv_path, {**row, "layer": layer["name"], "layer_numel": layer["numel"],
                                               "layer_density": 1 - layer["sparsity"]}, fields)
                    else:
                        _append(csv_path, row, fields)
                    print({k: row.get(k) for k in ("criterion", "sparsity", "warmup", "seed", "num_collapsed",
                                               "test_acc", "score_seconds")}, flush=True)


def one_run(a, spec, train_set, test_set, crit, sparsity, wu, seed, setting):
    torch.manual_seed(seed)
    model = build_model(a.model).to(a.device)
    params = None if a.all_layers else (list(spec.prunable) if spec.prunable else None)
    score_loader = make_loader(subset(train_set, a.score_samples, seed=seed), a.score_batch_size,
                               shuffle=True, seed=seed)
    res = prune_at_init(model, score_loader, sparsity=sparsity, criterion=crit, mode=a.mode, loss_fn=spec.loss_fn,
                        params=params, num_probes=a.num_probes, min_density=a.min_density,
                        warmup_batches=min(a.warmup_batches, len(score_loader)) if wu == "on" else 0,
                        seed=seed, progress=False)
    row = dict(model=a.model, criterion=crit, sparsity=sparsity, warmup=wu, seed=seed, mode=a.mode,
               min_density=a.min_density,
               actual_sparsity=round(res.sparsity, 5), num_collapsed=len(res.collapsed),
               collapsed=";".join(res.collapsed), score_seconds=round(sum(res.timings.values()), 3),
               num_probes=a.num_probes, score_samples=a.score_samples,
               warmup_batches=min(a.warmup_batches, len(score_loader)) if wu == "on" else 0,
               params="default" if params else "all", device=a.device, torch=torch.__version__, setting=setting)
    if a.collapse_only:
        row["layers"] = res.layers
        return row
    attach_masks(model, res.masks)
    loader = make_loader(train_set, a.batch_size, shuffle=True, seed=seed)
    stats = train(model, Augmented(loader) if a.augment else loader, epochs=a.epochs, max_steps=a.max_steps,
                  lr=a.lr, weight_decay=a.weight_decay, loss_fn=spec.loss_fn, progress=False)
    row.update(train_steps=stats["steps"], train_epochs=round(stats["steps"] / len(loader), 3),
               train_samples=len(train_set), batch_size=a.batch_size, lr=a.lr, augment=a.augment,
               test_samples=len(test_set), test_acc=round(evaluate(model, test_set), 4),
               final_loss=round(stats["final_loss"], 4))
    return row


def plot(a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(a.out, f"pai_{a.model}.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    groups, dense = {}, [float(r["test_acc"]) for r in rows if float(r["sparsity"]) == 0]
    rows = [r for r in rows if float(r["sparsity"]) > 0]
    for r in rows:
        md = float(r.get("min_density") or 0)
        by_s = groups.setdefault((r["criterion"], r["warmup"], md), {})
        by_s.setdefault(float(r["sparsity"]), []).append(float(r["test_acc"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, ((crit, wu, md), by_s) in enumerate(sorted(groups.items())):
        xs = sorted(by_s)
        mean = [sum(by_s[s]) / len(by_s[s]) for s in xs]
        lo = [min(by_s[s]) for s in xs]
        hi = [max(by_s[s]) for s in xs]
        style = "--" if wu == "off" else (":" if md > 0 else "-")
        label = crit if wu in ("n/a", "on") else f"{crit} (no warm-up)"
        label += f" (min density {md:g})" if md > 0 else ""
        dens = [100 * (1 - s) for s in xs]  # log density axis spreads out 90..99% sparsity
        line, = ax.plot(dens, [100 * m for m in mean], style, marker="o", ms=3, label=label,
                        color=f"C{CRITERIA.index(crit)}")
        ax.fill_between(dens, [100 * v for v in lo], [100 * v for v in hi], alpha=0.12, color=line.get_color())
    if dense:
        ax.axhline(100 * sum(dense) / len(dense), color="gray", ls="--", lw=1, label="dense (same schedule)")
    ticks = sorted({float(r["sparsity"]) for r in rows})
    ax.set_xscale("log")
    ax.set_xticks([100 * (1 - s) for s in ticks], [f"{100 * s:g}" for s in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("sparsity (%) (log density axis)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{a.model}: prune at init + train ({rows[0]['setting'].split(':')[0]}, {rows[0]['device']})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, f"pai_{a.model}.png"), dpi=120)
    print("wrote", os.path.join(a.out, f"pai_{a.model}.png"))


def estimator_check(out: str, seed: int = 0) -> str:
    """Hutchinson diag(H) vs the exact diagonal on a 64-16-10 tanh MLP on digits (256 samples):
    relative L2 error vs number of probes (10 repeats each) against the theory
    sqrt(sum_i sum_{j!=i} H_ij^2 / P) / ||diag H||. Writes pai_hutchinson_error.{csv,png}."""
    from torch.func import functional_call, hessian

    from woodfisher.data import load_digits
    from woodfisher.pai import hutchinson_diagonal
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)).double()
    x, y = load_digits("train")[:256]
    x = x.double()
    names = ["0.weight", "2.weight"]
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    h = hessian(lambda ps: torch.nn.functional.cross_entropy(functional_call(model, ps, (x,)), y))(params)
    blocks = [torch.cat([h[a][b].reshape(params[a].numel(), params[b].numel()) for b in names], 1) for a in names]
    full = torch.cat(blocks, 0)
    exact = torch.diag(full)
    off = (full - torch.diag(exact)).square().sum()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for probes in [1, 2, 4, 8, 16, 32, 64, 128, 256]:
        for rep in range(10):
            est = hutchinson_diagonal(model, [(x, y)], params=names, num_probes=probes, probe_batch=32, generator=gen)
            d = torch.cat([est.diag[n].flatten() for n in names])
            rows.append(dict(probes=probes, repeat=rep, rel_error=((d - exact).norm() / exact.norm()).item(),
                             theory=(off / probes).sqrt().item() / exact.norm().item()))
    csv_path = os.path.join(out, "pai_hutchinson_error.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ps = sorted({r["probes"] for r in rows})
    rms = [(sum(r["rel_error"] ** 2 for r in rows if r["probes"] == p) / 10) ** 0.5 for p in ps]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(ps, rms, "o-", label="measured (RMS of 10 repeats)")
    ax.loglog(ps, [r["theory"] for r in rows if r["repeat"] == 0], "k--", label="theory ~ 1/sqrt(P)")
    ax.set_xlabel("Rademacher probes P")
    ax.set_ylabel("||est - diag H|| / ||diag H||")
    ax.set_title(f"Hutchinson diagonal, {exact.numel()} weights")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pai_hutchinson_error.png"), dpi=120)
    return "\n".join(f"| {p} | {r:.3f} | {t:.3f} |" for p, r, t in
                     zip(ps, rms, [r["theory"] for r in rows if r["repeat"] == 0]))


def summary(a) -> str:
    """Markdown tables from the CSVs: accuracy mean +- std (collapsed layers summed over seeds)."""
    import statistics as st
    out = []
    path = os.path.join(a.out, f"pai_{a.model}.csv")
    if os.path.exists(path):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        cells, keys = {}, []
        for r in rows:
            md = float(r.get("min_density") or 0)
            key = r["criterion"] + ("" if r["warmup"] in ("n/a", "on") else " (no warm-up)") + \
                (f" (min density {md:g})" if md > 0 else "")
            key = "dense (no pruning)" if float(r["sparsity"]) == 0 else key
            if key not in keys:
                keys.append(key)
            c = cells.setdefault((key, float(r["sparsity"])), [[], 0])
            c[0].append(100 * float(r["test_acc"]))
            c[1] += int(r["num_collapsed"])
        sps = sorted({s for _, s in cells})
        out.append("| criterion | " + " | ".join(f"{100 * s:g}%" for s in sps) + " |")
        out.append("|---|" + "---:|" * len(sps))
        for k in keys:
            vals = []
            for s in sps:
                if (k, s) not in cells:
                    vals.append("")
                    continue
                accs, col = cells[(k, s)]
                txt = f"{st.mean(accs):.1f}" + (f" ± {st.pstdev(accs):.1f}" if len(accs) > 1 else "")
                vals.append(txt + (f" [{col}c]" if col else ""))
            out.append(f"| {k} | " + " | ".join(vals) + " |")
    path = os.path.join(a.out, f"pai_{a.model}_collapse.csv")
    if os.path.exists(path):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        coll = {}
        for r in rows:
            key = (r["criterion"], r["warmup"])
            d = coll.setdefault(key, {})
            d.setdefault(float(r["sparsity"]), set())
            if r["layer"] in r["collapsed"].split(";"):
                d[float(r["sparsity"])].add(r["layer"].removesuffix(".weight"))
        sps = sorted({s for d in coll.values() for s in d})
        out.append("\n| criterion | warm-up | " + " | ".join(f"collapsed @ {100 * s:g}%" for s in sps) + " |")
        out.append("|---|---|" + "---|" * len(sps))
        for (crit, wu), d in coll.items():
            out.append(f"| {crit} | {wu} | " + " | ".join(
                (f"{len(d[s])}: " + ", ".join(sorted(d[s]))) if d.get(s) else "0" for s in sps) + " |")
    return "\n".join(out)


def main(argv=None):
    a = parse_args(argv)
    if a.model == "estimator":
        print("| probes | RMS rel. error | theory |\n|---:|---:|---:|\n" + estimator_check(a.out))
        return
    if not a.plot:
        print(f"# {a.model} on {a.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}",
              file=sys.stderr)
        t0 = time.time()
        run(a)
        print(f"# done in {time.time() - t0:.0f} s", file=sys.stderr)
    if not a.collapse_only:
        plot(a)
    if a.plot:
        print(summary(a))


if __name__ == "__main__":
    main()
