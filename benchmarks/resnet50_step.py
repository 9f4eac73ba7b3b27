"""End to end: one one-shot WoodFisher pruning step of torchvision's ResNet-50 (GPU).

    python -m benchmarks.resnet50_step --out benchmarks/results                 # both paper settings
    python -m benchmarks.resnet50_step --setting 1000x80 --sparsity 0.6
    python -m benchmarks.resnet50_step --model smoke --device cpu              # tiny CPU smoke run

Paper settings: block 1000 with m = 80 gradients of fisher mini-batch 100, and block
2000 with m = 160 (the paper reports 15 to 47 minutes per step on its hardware).
Inputs are random (the timing does not depend on them). Phases timed: gradient
collection, inverse, statistics + mask selection, OBS update; beside them, the model's own
forward + backward over the same number of batches (``batched_fwd_bwd_s``; ``gradients_ratio`` =
that / the gradients phase, the ratio of issue 10). By default the public
pruner ``woodfisher.prune_one_shot`` runs the step (its own phase timings); with
``--api ops`` (or when the pruner is missing) the public kernel ops run directly on
gradients collected with plain autograd, each phase timed with a device synchronize.
torchvision is imported only for ``--model resnet50``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from benchmarks import _common as cm

SETTINGS = {"1000x80": (1000, 80), "2000x160": (2000, 160)}
PAPER_MINUTES = (15, 47)


def smoke_model(num_classes: int = 10) -> nn.Module:
    """A tiny CNN standing in for ResNet-50 in the CPU smoke run."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def build_model(name: str, device) -> tuple:
    """(model, num_classes, image size) with random weights."""
    if name == "resnet50":
        import torchvision  # GPU machine only
        return torchvision.models.resnet50(weights=None).to(device), 1000, 224
    return smoke_model().to(device), 10, 16


def random_loader(num_batches: int, batch: int, image: int, classes: int, device, seed: int = 0):
    """Yields ``num_batches`` (inputs (batch, 3, image, image), labels) pairs on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    class Loader:
        def __iter__(self):
            for _ in range(num_batches):
                x = torch.randn(batch, 3, image, image, device=device, generator=gen)
                yield x, torch.randint(0, classes, (batch,), device=device, generator=gen)

        def __len__(self):
            return num_batches
    return Loader()


def prunable(model: nn.Module):
    return [(n + ".weight", m.weight) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def step_with_ops(model, loader, c: int, m: int, sparsity: float, damp: float, device, backend: str):
    """One global WoodFisher step with the public ops; returns {phase: seconds}."""
    import woodfisher_kernels as wk
    from woodfisher.masks import select_masks

    layers = prunable(model)
    t = {}
    cm.sync(device)
    t0 = time.perf_counter()
    grads = {name: [] for name, _ in layers}
    model.eval()                      # BatchNorm on running statistics, as in the pruner
    for x, y in loader:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        for name, p in layers:
            grads[name].append(p.grad.detach().flatten().clone())
    grads = {n: torch.stack(g) for n, g in grads.items()}       # (m, numel)
    cm.sync(device)
    t["gradients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    invs = {n: wk.blockwise_inverse(wk.to_blocks(g, c).transpose(0, 1).contiguous(), damp, backend=backend)
            for n, g in grads.items()}
    cm.sync(device)
    t["inverse"] = time.perf_counter() - t0
    del grads
    t0 = time.perf_counter()
    weights = {n: wk.to_blocks(p.detach().flatten(), c) for n, p in layers}
    scores = {}
    for n, p in layers:
        rho = wk.obs_saliency(invs[n], weights[n], backend=backend)
        valid = wk.valid_mask(p.numel(), c, device=device)
        scores[n] = wk.from_blocks(rho.masked_fill(~valid, float("inf")), p.numel()).view_as(p)
    masks = select_masks(scores, sparsity, "global")
    cm.sync(device)
    t["select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for n, p in layers:
            prune = ~wk.to_blocks(masks[n].flatten(), c)
            prune &= wk.valid_mask(p.numel(), c, device=device)
            new = wk.obs_update(invs[n], weights[n], prune, backend=backend)
            p.copy_(wk.from_blocks(new, p.numel()).view_as(p))
    cm.sync(device)
    t["update"] = time.perf_counter() - t0
    forms = sorted({"lowrank" if isinstance(v, wk.LowRankInverse) else "sequential" for v in invs.values()})
    return t, forms


def _one_step(model, loader, c, m, batch, args, api, device):
    """(phases {name: s}, inverse forms, sparsity) of one pruning step."""
    if api == "pruner":
        import woodfisher
        res = woodfisher.prune_one_shot(model, loader, sparsity=args.sparsity, block_size=c, num_grads=m,
                                        fisher_batch_size=batch, damp=args.damp, mode="global", num_steps=1,
                                        progress=True, backend=args.backend)  # one step, as in the paper
        phases = {k: v for k, v in res.timings.items() if k != "total"}
        return phases, sorted({row.get("inverse") for row in res.layers if row.get("inverse")}), res.sparsity
    phases, forms = step_with_ops(model, loader, c, m, args.sparsity, args.damp, device, args.backend)
    ws = [p for _, p in prunable(model)]
    return phases, forms, sum(int((p == 0).sum()) for p in ws) / sum(p.numel() for p in ws)


def batched_fwd_bwd(model, loader, device) -> float:
    """Seconds of the model's own forward + backward (cross-entropy, eval mode as the gradient
    collection) over every batch of ``loader``: the yardstick of the gradients phase, which
    runs the same samples in groups of fisher_batch_size (issue 10's ratio)."""
    import torch.nn.functional as F

    from woodfisher.state import eval_mode

    with eval_mode(model):
        cm.sync(device)
        t0 = time.perf_counter()
        for x, y in loader:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        cm.sync(device)
        secs = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return secs


def run_setting(args, device, setting: str) -> dict:
    c, m = SETTINGS[setting] if args.model == "resnet50" else (args.block_size, args.num_grads)
    model, classes, image = build_model(args.model, device)
    batch = args.fisher_batch if args.model == "resnet50" else 4
    loader = random_loader(m, batch, image, classes, device)
    api = args.api
    if api == "auto":
        import woodfisher
        api = "pruner" if hasattr(woodfisher, "prune_one_shot") else "ops"
    warm_s = None
    if args.warmup:   # one-off costs (CUDA context, cuBLAS, vmap tracing, Triton JIT) off the clock
        w0 = time.perf_counter()
        warm_model = build_model(args.model, device)[0]
        _one_step(warm_model, random_loader(2, batch, image, classes, device, seed=1), c, 2, batch, args, api,
                  device)
        del warm_model
        warm_s = time.perf_counter() - w0
    yardstick = batched_fwd_bwd(model, random_loader(m, batch, image, classes, device, seed=2), device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cm.sync(device)
    start = time.perf_counter()
    phases, forms, sparsity = _one_step(model, loader, c, m, batch, args, api, device)
    cm.sync(device)
    total = time.perf_counter() - start
    rec = {"model": args.model, "setting": f"block {c}, m = {m} x {batch}", "block_size": c, "num_grads": m,
           "fisher_batch_size": batch, "api": api, "backend": args.backend, "inverse_forms": forms,
           "params_pruned": sum(p.numel() for _, p in prunable(model)), "sparsity": sparsity,
           "phases_s": phases, "total_s": total, "warmup_step_s": warm_s, "batched_fwd_bwd_s": yardstick,
           "gradients_ratio": yardstick / phases["gradients"] if phases.get("gradients") else None,
           "target_s": 60.0 if (c, m) == (1000, 80) else None, "paper_minutes": PAPER_MINUTES}
    if device.type == "cuda":
        rec["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del model
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=["resnet50", "smoke"])
    p.add_argument("--setting", default="both", choices=["both", *SETTINGS])
    p.add_argument("--api", default="auto", choices=["auto", "pruner", "ops"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "torch"])
    p.add_argument("--sparsity", type=float, default=0.6)
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--fisher-batch", type=int, default=100)
    p.add_argument("--block-size", type=int, default=64, help="smoke model only")
    p.add_argument("--num-grads", type=int, default=8, help="smoke model only")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="also time one-off costs (a 2-gradient warm-up step runs first by default)")
    p.add_argument("--out", default=None, help="folder for resnet50_step_<device>.json")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error("--sparsity must lie in [0, 1)")
    cm.configure_precision()
    device = cm.pick_device(args.device)
    settings = list(SETTINGS) if args.setting == "both" else [args.setting]
    if args.model == "smoke":
        settings = settings[:1]
    result = {"device": cm.device_info(device), "runs": []}
    for s in settings:
        rec = run_setting(args, device, s)
        result["runs"].append(rec)
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in rec["phases_s"].items())
        print(f"[resnet50_step] {rec['model']} {rec['setting']} ({rec['api']}, {rec['inverse_forms']}): "
              f"total {rec['total_s']:.2f} s; {phases}; the model's own fwd+bwd over the same samples "
              f"{rec['batched_fwd_bwd_s']:.2f} s", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{args.model}_step_{device.type}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"[resnet50_step] wrote {path}")
    return result


if __name__ == "__main__":
    main()
