"""Compile every Triton kernel variant woodfisher_kernels launches, with the argument
specialization of a real GPU launch, for CUDA sm_90, on a machine without a GPU.

    TRITON_INTERPRET=0 PYTHONPATH=. python scripts/triton_spec_compile.py [--quick] [--json FILE]
        [--cases build:128:128,update:128:1,...] [--cubin-dir DIR]

The backend's public launch functions run on small CPU tensors with every kernel's
``kernel[grid](...)`` intercepted: the JIT's own binder derives the specialization a GPU
launch gets (16-byte-aligned pointers and integers divisible by 16 -> divisibility 16,
integers equal to 1 -> constants), so the variants compiled are the ones a GPU runs.
Per distinct variant it prints one JSON line: registers, stack frame and local-memory
spill instructions of the cubin triton's own compile produced (triton's bundled cuobjdump),
shared memory, programs per SM on an H100/H200 (registers, shared memory and threads), and
whether the PTX holds non-IEEE float32 division / square root
(div.full / div.approx / sqrt.approx / rcp.approx). Exits 1 when a variant fails to
compile, spills, or uses a non-IEEE instruction. ``--cases`` compiles only the variants that
the given calls (``build`` = fisher_inverse, ``update`` = woodbury_update_, ``:c:k``) launch
and tags each row with its case; ``--cubin-dir`` keeps every variant's cubin (for
python -m benchmarks.static_model, which disassembles them). Uses triton's private
``create_function_from_signature`` and ``JITFunction._pack_args`` (triton 3.6 - 3.9).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as tcompile
from triton.runtime.jit import create_function_from_signature

from woodfisher_kernels._triton import obs as ob
from woodfisher_kernels._triton import woodbury as wb
from woodfisher_kernels._triton import woodbury_tiled as wt

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SM = {"regs": 65536, "smem": 228 * 1024, "smem_reserved": 1024, "threads": 2048, "programs": 32}
NON_IEEE = re.compile(r"\b(div\.full\.f32|div\.approx\.f32|div\.approx\.ftz\.f32|sqrt\.approx\.(ftz\.)?f32|"
                      r"rcp\.approx\.(ftz\.)?f32)\b")


def cubin_report(cubin):
    """(registers, stack bytes, local-memory store / load instructions) of the cubin triton's own
    compile produced (cuobjdump -res-usage and -sass: exact for every triton version)."""
    exe = os.path.join(BIN, "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([exe, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([exe, "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    return (int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1,
            len(re.findall(r"\bSTL\b", sass)), len(re.findall(r"\bLDL\b", sass)))


def programs_per_sm(regs, smem, num_warps):
    """Resident programs per SM (sm_90) from registers (allocated per warp in units of 256),
    shared memory (+1 KiB reserved per program) and threads."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM["regs"] // (per_warp * num_warps)
    by_smem = SM["smem"] // (smem + SM["smem_reserved"])
    return int(min(by_regs, by_smem, SM["threads"] // (32 * num_warps), SM["programs"]))


class Intercept:
    """Stands in for a JITFunction: ``kernel[grid](*args)`` compiles instead of launching."""

    def __init__(self, jit, tag, seen, rows, cubin_dir=None):
        self.jit, self.tag, self.seen, self.rows, self.cubin_dir = jit, tag, seen, rows, cubin_dir
        self.case = None

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            k = self.jit
            binder = create_function_from_signature(k.signature, k.params, BACKEND)
            bound, spec, opts = binder(*args, **kwargs)
            options, signature, constexprs, attrs = k._pack_args(BACKEND, kwargs, bound, spec, opts)
            key = (self.tag, str(signature), str(sorted(constexprs.items())), str(sorted(attrs.items())),
                   str(sorted(kwargs.items())))
            if key in self.seen:
                for rec in self.rows:
                    if rec["_key"] == key and self.case and self.case not in rec["cases"]:
                        rec["cases"].append(self.case)
                return
            self.seen.add(key)
            names = [p.name for p in k.params]
            rec = {"kernel": self.tag, "constexprs": {names[p[0]]: v for p, v in constexprs.items()},
                   "div16": [names[p[0]] for p, v in attrs.items() if v], "num_warps": options.num_warps,
                   "cases": [self.case] if self.case else [], "_key": key}
            t0 = time.time()
            try:
                compiled = tcompile(ASTSource(k, signature, constexprs, attrs), target=TARGET,
                                    options=options.__dict__)
                ptx = compiled.asm["ptx"]
                rec["regs"], rec["stack"], rec["stl"], rec["ldl"] = cubin_report(compiled.asm["cubin"])
                rec["spill_bytes"] = rec["stack"] if rec["stl"] or rec["ldl"] else 0
                rec["smem"] = compiled.metadata.shared
                rec["programs_per_sm"] = programs_per_sm(rec["regs"], rec["smem"], options.num_warps)
                rec["non_ieee"] = sorted({m.group(1) for m in NON_IEEE.finditer(ptx)})
                if self.cubin_dir:
                    rec["cubin"] = os.path.join(self.cubin_dir, f"{self.tag}_{len(self.rows)}.cubin")
                    with open(rec["cubin"], "wb") as f:
                        f.write(compiled.asm["cubin"])
            except Exception as exc:  # report every failing variant
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rec["compile_s"] = round(time.time() - t0, 1)
            self.rows.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "_key"}), flush=True)
        return call


def _intercept(cubin_dir):
    seen, rows = set(), []
    hooks = [Intercept(wb._woodbury_reg_kernel, "wb_reg", seen, rows, cubin_dir),
             Intercept(wt.KERNEL, "wb_tiled", seen, rows, cubin_dir),
             Intercept(ob._saliency_kernel, "obs_saliency", seen, rows, cubin_dir),
             Intercept(ob._update_kernel, "obs_update", seen, rows, cubin_dir)]
    wb._woodbury_reg_kernel, wt.KERNEL, ob._saliency_kernel, ob._update_kernel = hooks
    return hooks, rows


def run(quick: bool, cubin_dir=None):
    hooks, rows = _intercept(cubin_dir)
    sizes = [7, 50, 64, 128, 200, 256] if quick else [1, 7, 20, 50, 64, 100, 128, 200, 256, 257, 1000, 10000]
    grads = [1, 3, 16, 17, 64] if quick else [1, 3, 8, 16, 17, 33, 64, 80, 128, 130, 256, 400]
    for c in sizes:
        for k in grads:
            g = torch.zeros(1, k, c)
            wb.woodbury_update_(torch.zeros(1, c, c), g, 1.0)
            wb.fisher_inverse(g, 0.5, 1.0)
            if c <= 64:  # the tests also force the tiled variant on small blocks
                wb.fisher_inverse(g, 0.5, 1.0, tiled=True)
        w = torch.zeros(3, c)
        for lg in (None, w):
            ob.obs_saliency(torch.zeros(3, c, c), w, lg)
            ob.obs_update(torch.zeros(3, c, c), w, torch.zeros(3, c, dtype=torch.bool), lg)
    return rows


def run_cases(cases, cubin_dir=None):
    """Compile the variants launched by each case "build:c:k" / "update:c:k"; rows tagged with it."""
    hooks, rows = _intercept(cubin_dir)
    for case in cases:
        op, c, k = case.split(":")
        c, k = int(c), int(k)
        for h in hooks:
            h.case = case
        g = torch.zeros(1, k, c)
        if op == "build":
            wb.fisher_inverse(g, 0.5, 1.0)
        else:
            wb.woodbury_update_(torch.zeros(1, c, c), g, 1.0)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer block sizes and gradient counts (CI)")
    p.add_argument("--json", default=None, help="write all rows to this JSON file")
    p.add_argument("--cases", default=None, help="comma list of build:c:k / update:c:k (only these variants)")
    p.add_argument("--cubin-dir", default=None, help="keep each variant's cubin in this folder")
    args = p.parse_args(argv)
    if args.cubin_dir:
        os.makedirs(args.cubin_dir, exist_ok=True)
    rows = run_cases(args.cases.split(","), args.cubin_dir) if args.cases else run(args.quick, args.cubin_dir)
    for r in rows:
        r.pop("_key", None)
    bad = [r for r in rows if "error" in r or r.get("spill_bytes", 0) != 0 or r.get("non_ieee")]
    low = [r for r in rows if r.get("programs_per_sm", 2) < 2]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "rows": rows}, f, indent=1)
    print(f"SUMMARY triton {triton.__version__}: {len(rows)} variants, {len(bad)} failing, spilling or "
          f"non-IEEE; {len(low)} with 1 program per SM ({sorted({r['kernel'] for r in low})})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
