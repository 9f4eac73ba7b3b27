"""Compile every Triton kernel configuration for a GPU target without a GPU.

    TRITON_INTERPRET=0 python -m woodfisher_kernels._triton.compile_check [--arch 90] [--quick]

Runs triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for the launch
configurations the backend really uses (``woodbury.launch_config``, ``obs.tile_config``)
and, when triton's bundled ``ptxas`` is found, prints its register and spill report.
Exits 1 when a configuration fails to compile (or spills, with ``--no-spills``).
Must run with the interpreter off: ``@triton.jit`` reads TRITON_INTERPRET at import.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

BLOCK_SIZES = (1, 20, 50, 64, 200)      # padded 16, 32, 64 (register) and tiled
GRAD_COUNTS = (4, 100)                  # tiled chunk of 16 and of 32 gradients


def _configs(quick: bool):
    from . import obs, woodbury
    fp = "*fp32"
    seen = set()
    for c in (50, 200) if quick else BLOCK_SIZES:
        for k in (100,) if quick else GRAD_COUNTS:
            for init in (True,) if quick else (False, True):
                kernel, consts, opts = woodbury.launch_config(c, k)
                consts = dict(consts, INIT=init)
                sig = {"inv_ptr": fp, "g_ptr": fp, "c": "i32", "k": "i32", "num_samples": "fp32",
                       "inv_damp": "fp32"}
                if kernel is woodbury._woodbury_tiled_kernel:
                    sig = {"inv_ptr": fp, "g_ptr": fp, "w_ptr": fp, **{n: t for n, t in sig.items() if n not in ("inv_ptr", "g_ptr")}}
                key = (kernel.__name__, tuple(sorted(consts.items())))
                if key not in seen:
                    seen.add(key)
                    yield kernel, {**sig, **{n: "constexpr" for n in consts}}, consts, opts
    consts, opts = obs.tile_config(200)
    for has_lg in (False, True):
        c = dict(consts, HAS_LG=has_lg)
        yield (obs._saliency_kernel, {"inv_ptr": fp, "w_ptr": fp, "lg_ptr": fp, "out_ptr": fp, "c": "i32",
                                      **{n: "constexpr" for n in c}}, c, opts)
        yield (obs._update_kernel, {"inv_ptr": fp, "w_ptr": fp, "p_ptr": "*u8", "lg_ptr": fp, "t_ptr": fp,
                                    "out_ptr": fp, "c": "i32", **{n: "constexpr" for n in c}}, c, opts)


def _ptxas_report(triton_dir: str, ptx: str, arch: int) -> str:
    for name in ("ptxas-blackwell", "ptxas"):
        exe = os.path.join(triton_dir, "backends", "nvidia", "bin", name)
        if not os.path.exists(exe):
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            res = subprocess.run([exe, "-v", f"-arch=sm_{arch}a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        if res.returncode == 0:
            regs = re.search(r"Used (\d+) registers", res.stderr)
            spill = re.search(r"(\d+) bytes spill stores", res.stderr)
            return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes spilled"
    return "no ptxas report"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel")
    parser.add_argument("--no-spills", action="store_true", help="fail on register spills")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failed = False
    for kernel, sig, consts, opts in _configs(args.quick):
        name = f"{kernel.__name__} {consts} {opts}"
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts), target=target, options=opts)
        except Exception as exc:  # report every failing configuration, not just the first
            print(f"FAIL {name}: {exc}")
            failed = True
            continue
        report = _ptxas_report(os.path.dirname(triton.__file__), compiled.asm["ptx"], args.arch)
        spilled = re.search(r", (\d+) bytes spilled", report)
        if args.no_spills and spilled and int(spilled.group(1)) > 0:
            failed = True
        print(f"ok   {name}: smem {compiled.metadata.shared} B, {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
