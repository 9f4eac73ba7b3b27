"""Launches profiled by the gpu_check `prof` stage (Nsight Compute): the CUDA build kernels at
the target shapes, one launch each after a warm-up, marked with NVTX ranges.

    ncu --nvtx --nvtx-include 'prof/' ... python3 scripts/gpu_check/prof_case.py

Shapes (c, m, path): (64, 64, shared), (128, 128, shared), (128, 128, tiled), (512, 64, tiled), on
as many blocks as a 4,194,304-parameter model has (d / c), as the side-by-side profile."""
import torch

from woodfisher_kernels import _cuda

D = 4_194_304
CASES = [(64, 64, "shared"), (128, 128, "shared"), (128, 128, "tiled"), (512, 64, "tiled")]


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    for c, m, path in CASES:
        grads = torch.randn(D // c, m, c, device="cuda")
        _cuda.fisher_inverse(grads, 1e-2, float(m), path)   # warm-up (attributes, allocator)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(f"c{c}_m{m}_{path}")
        _cuda.fisher_inverse(grads, 1e-2, float(m), path)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        del grads


if __name__ == "__main__":
    main()
