"""Tiny calls of every op of the CUDA extension and every Triton kernel variant family (run
under compute-sanitizer memcheck). Exit 0 when every call ran and produced finite output."""
import sys

import torch

import woodfisher_kernels as wk
from woodfisher_kernels import _cuda


def main():
    torch.manual_seed(0)
    dev = "cuda"
    backends = ["triton"] + (["cuda"] if _cuda.AVAILABLE else [])
    bad = 0
    for backend in backends:
        # rank-one / chunked paths, register / shared and tiled variants, chunk widths 4 .. 32
        for c, k, b in ((50, 20, 3), (64, 17, 2), (64, 3, 2), (130, 5, 2), (300, 3, 1), (300, 40, 1)):
            g = torch.randn(b, k, c, device=dev)
            inv = wk.fisher_inverse(g, 0.5, backend=backend)
            wk.woodbury_update_(inv, torch.randn(b, 1, c, device=dev), 2.0 * k, backend=backend)
            w, lg = torch.randn(b, c, device=dev), 0.1 * torch.randn(b, c, device=dev)
            mask = torch.rand(b, c, device=dev) < 0.3
            outs = [inv, wk.obs_saliency(inv, w, backend=backend), wk.obs_saliency(inv, w, lg, backend=backend),
                    wk.obs_update(inv, w, mask, backend=backend), wk.obs_update(inv, w, mask, lg, backend=backend)]
            torch.cuda.synchronize()
            ok = all(bool(torch.isfinite(o).all()) for o in outs)
            bad += not ok
            print(f"{backend:6s} c={c:3d} k={k:2d} B={b}: {'ok' if ok else 'NON-FINITE OUTPUT'}", flush=True)
    if _cuda.AVAILABLE:
        for path in ("shared", "tiled"):
            g = torch.randn(2, 9, 64, device=dev)
            inv = _cuda.fisher_inverse(g, 0.5, 9.0, path)
            _cuda.woodbury_update_(inv, g, 18.0, path)
            torch.cuda.synchronize()
            print(f"cuda path={path}: {'ok' if bool(torch.isfinite(inv).all()) else 'NON-FINITE OUTPUT'}")
    print("ops_smoke:", "FAILED" if bad else "passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
