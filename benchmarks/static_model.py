"""Static performance model of the CUDA and Triton kernels, generated from the build (no GPU).

    python -m benchmarks.static_model --out benchmarks/results      # kernels_static.{md,json}
    python -m benchmarks.static_model --check --build-dir DIR --driver EXE   # CI goals only

Per kernel: registers, spills (ptxas, sm_90) and the SASS instruction mix (cuobjdump: FFMA,
shared / global loads and stores, FFMA per load). Per kernel and case (op, c, k): the
kernel variant launched, dynamic shared memory (from the C++ launchers, through the
emulated driver's ``--resources``), resident CTAs / programs per SM, and the cost model's
flops, bytes and predicted fraction of the float32 peak and of memory bandwidth on an
H100 and an H200 (woodfisher_kernels._cost, the model behind backend="auto"), for a
ResNet-50-sized model (d = 25,557,032 parameters, B = d / c blocks). Predictions, not
measurements: no GPU has run these kernels yet.

``--check`` asserts the static goals (issue 11): FFMA per shared/global load >= 4 in the
SASS of the shared-memory build kernel, no spills in any CUDA kernel, >= 2 CTAs per SM for
that kernel at c = 128, and that the cost model's geometry (shared memory, kernel path,
registers assumed for occupancy) agrees with the build.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from woodfisher_kernels import _cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUDA_SOURCES = ("woodbury_shared", "woodbury_tiled", "obs")
RESNET50 = 25_557_032
CASES = [("build", 50, 1024), ("build", 64, 16), ("build", 64, 64), ("build", 128, 16), ("build", 128, 128),
         ("build", 128, 256), ("build", 200, 200), ("build", 256, 64), ("build", 256, 256), ("build", 1000, 80),
         ("build", 1000, 400), ("update", 64, 1), ("update", 64, 16), ("update", 64, 128), ("update", 128, 1),
         ("update", 128, 16), ("update", 128, 128), ("update", 256, 1), ("update", 256, 16), ("update", 256, 128)]
LOADS = ("LDS", "LDG")
MIX = ("FFMA", "FMUL", "FADD", "DFMA", "LDS", "LDG", "STS", "STG", "SHFL", "BAR", "LDL", "STL")


def tool(name):
    """A CUDA binary tool from PATH, or the copy triton bundles."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def build_cuda(build_dir):
    """nvcc -arch=sm_90 -Xptxas -v per source (skipped when the object and log exist)."""
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    for name in CUDA_SOURCES:
        obj, log = os.path.join(build_dir, f"{name}.cu.o"), os.path.join(build_dir, f"{name}.cu.ptxas.log")
        if os.path.exists(obj) and os.path.exists(log):
            continue
        res = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-Icsrc", "-Xptxas", "-v", "-c",
                              f"csrc/{name}.cu", "-o", obj], cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"nvcc failed for {name}.cu:\n{res.stderr}")
        with open(log, "w") as f:
            f.write(res.stderr)


def ptxas_resources(log_text):
    """{mangled kernel name: {regs, spill_bytes, stack}} from an -Xptxas -v log."""
    out, name = {}, None
    for line in log_text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
            out[name] = {"regs": None, "spill_bytes": 0, "stack": 0}
        elif name and "bytes stack frame" in line:
            out[name]["stack"] = int(re.search(r"(\d+) bytes stack frame", line).group(1))
            out[name]["spill_bytes"] = int(re.search(r"(\d+) bytes spill stores", line).group(1))
        elif name and "Used" in line and "registers" in line:
            out[name]["regs"] = int(re.search(r"Used (\d+) registers", line).group(1))
    return out


def sass_mix(binary):
    """{kernel name: Counter of SASS opcodes} from cuobjdump -sass (an object file or cubin)."""
    text = subprocess.run([tool("cuobjdump"), "-sass", binary], capture_output=True, text=True, check=True).stdout
    out = {}
    for part in re.split(r"\n\s+Function : ", text)[1:]:
        ops = collections.Counter()
        for line in part.splitlines():
            m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if m:
                ops[m.group(1)] += 1
        out[part.split("\n", 1)[0].strip()] = ops
    return out


def mix_summary(ops):
    loads = sum(ops[o] for o in LOADS)
    return {**{o: ops[o] for o in MIX}, "total": sum(ops.values()),
            "ffma_per_load": round(ops["FFMA"] / loads, 2) if loads else None}


def cuda_kernels(build_dir):
    rows = {}
    for name in CUDA_SOURCES:
        with open(os.path.join(build_dir, f"{name}.cu.ptxas.log")) as f:
            res = ptxas_resources(f.read())
        for kernel, ops in sass_mix(os.path.join(build_dir, f"{name}.cu.o")).items():
            short = re.search(r"(woodbury_shared_kernel|woodbury_tiled_kernel|saliency_plain_kernel|"
                              r"saliency_woodtaylor_kernel|obs_update_kernel)(ILb([01])E)?", kernel)
            label = short.group(1) + ("<vec>" if short.group(3) == "1" else "<scalar>" if short.group(3) else "")
            rows[label] = {"mangled": kernel, **res.get(kernel, {}), **mix_summary(ops)}
    return rows


def driver_resources(driver, cases):
    arg = [f"{c}x{k}" for c, k in cases]
    out = subprocess.run([driver, "--resources", *arg], capture_output=True, text=True, check=True).stdout
    return {(r["c"], r["k"]): r for r in map(json.loads, out.splitlines())}


def build_driver(build_dir):
    exe = os.path.join(build_dir, "driver_resources")
    if not os.path.exists(exe):
        srcs = [f"csrc/{n}.cu" for n in ("obs", "woodbury", "woodbury_shared", "woodbury_tiled")]
        subprocess.run([os.environ.get("CXX", "g++"), "-std=c++17", "-O0", "-DWF_EMULATE", "-Icsrc", "-x", "c++",
                        *srcs, "-x", "none", "csrc/driver/woodfisher_driver.cpp", "-o", exe], cwd=ROOT, check=True)
    return exe


def triton_variants(cases, work):
    """Rows of scripts/triton_spec_compile.py for the cases, each with the SASS mix of its cubin."""
    out = os.path.join(work, "triton.json")
    spec = ",".join(f"{op}:{c}:{k}" for op, c, k in cases)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_spec_compile.py"), "--cases", spec,
                          "--json", out, "--cubin-dir", os.path.join(work, "cubin")], env=env,
                         capture_output=True, text=True)
    if not os.path.exists(out):
        return None, res.stdout[-2000:] + res.stderr[-2000:]
    with open(out) as f:
        data = json.load(f)
    for r in data["rows"]:
        if r.get("cubin"):
            r.update(mix_summary(next(iter(sass_mix(r.pop("cubin")).values()))))
    return data, None


def case_rows(kernels, resources, triton):
    rows = []
    for op, c, k in CASES:
        b = -(-RESNET50 // c)
        name = "fisher_inverse" if op == "build" else "woodbury_update_"
        shape = (b, k, c) if op == "build" else (b, c, c)
        for backend in ("cuda", "triton", "torch"):
            row = {"op": op, "c": c, "k": k, "B": b, "backend": backend}
            if backend == "cuda":
                r = resources[(c, k)]
                if r["path"] == "none":
                    continue
                label = f"woodbury_{r['path']}_kernel<{'vec' if c % 4 == 0 else 'scalar'}>"
                kern = kernels[label]
                ctas = _cost.ctas_per_sm(r["smem"], kern["regs"], 256)
                row.update(kernel=label, chunk=r["chunk"], smem=r["smem"], regs=kern["regs"], per_sm=ctas,
                           **{x: kern[x] for x in ("FFMA", "LDS", "LDG", "ffma_per_load")})
            elif backend == "triton" and triton:
                t = [v for v in triton["rows"] if f"{op}:{c}:{k}" in v.get("cases", [])]
                if t:
                    v = t[0]
                    row.update(kernel=f"{v['kernel']} {v['constexprs']} warps={v['num_warps']}", smem=v.get("smem"),
                               regs=v.get("regs"), per_sm=v.get("programs_per_sm"),
                               **{x: v.get(x) for x in ("FFMA", "LDS", "LDG", "ffma_per_load")})
            elif backend == "triton":
                continue
            else:
                row["kernel"] = "torch (cuBLAS bmm + batched Cholesky / triangular solve)"
            for spec in (_cost.H100, _cost.H200):
                p = _cost.predict(name, backend, shape, None if op == "build" else k, spec)
                tag = "h200" if spec is _cost.H200 else "h100"
                row.update({"flops": p.flops, "executed_flops": p.executed, "bytes": p.bytes,
                            f"{tag}_s": p.seconds, f"{tag}_peak_frac": p.flops / p.seconds / spec.fp32_flops,
                            f"{tag}_bw_frac": _min_bytes(op, c, k, b) / p.seconds / spec.hbm_bytes_s,
                            f"{tag}_bound": p.bound})
            rows.append(row)
    return rows


def _min_bytes(op, c, k, b):
    """Fewest bytes: gradients read once, the inverse written once (and read once for an update)."""
    return 4.0 * b * (k * c + c * c * (1 if op == "build" else 2))


def check_goals(kernels, resources):
    """(goal, value, ok) for the static goals and the cost model's agreement with the build."""
    goals = []
    for label in ("woodbury_shared_kernel<vec>", "woodbury_shared_kernel<scalar>"):
        goals.append((f"{label}: FFMA per shared/global load >= 4 (SASS)", kernels[label]["ffma_per_load"],
                      kernels[label]["ffma_per_load"] >= 4))
    spills = {k: v["spill_bytes"] for k, v in kernels.items()}
    goals.append(("no register spills in any CUDA kernel (ptxas)", spills, not any(spills.values())))
    for k in (32, 128):
        r = resources[(128, k)]
        ctas = _cost.ctas_per_sm(r["smem"], kernels["woodbury_shared_kernel<vec>"]["regs"], 256)
        goals.append((f"shared kernel at c=128, k={k}: >= 2 CTAs per SM", ctas, r["path"] == "shared" and ctas >= 2))
    bad = [(c, k) for (c, k), r in resources.items()
           if r["shared_smem"] != _cost.cuda_shared_smem(c, r["chunk"]) or r["tiled_smem"] != _cost.cuda_tiled_smem(
               c, r["chunk"]) or r["chunk"] != _cost.chunk_width(k)
           or (r["path"] != "none" and r["path"] != _cost.cuda_path(c, k))]
    goals.append(("cost model geometry == C++ launchers (shared memory, chunk, path)", bad or "all equal", not bad))
    regs = {k: v["regs"] for k, v in kernels.items() if "woodbury" in k}
    assumed = {"shared": 128, "tiled": 192}   # registers _cost assumes for occupancy
    ok = all(v <= assumed["shared" if "shared" in k else "tiled"] for k, v in regs.items())
    goals.append(("registers <= what the cost model assumes (shared 128, tiled 192)", regs, ok))
    return goals


def fmt_s(x):
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def markdown(res):
    L = ["# Static performance model of the kernels (no GPU run)", "",
         f"Generated {res['date']} by `python -m benchmarks.static_model --out benchmarks/results` from the build: "
         f"{res['toolchain']['nvcc']}, triton {res['toolchain'].get('triton')} (sm_90). Registers / spills from ptxas, "
         "instruction mix from `cuobjdump -sass` (static counts), shared memory from the C++ launchers, predicted "
         "times from `woodfisher_kernels/_cost.py` (roofline per implementation; efficiencies are estimates). "
         f"Peaks: H100 {_cost.H100.fp32_flops / 1e12:.0f} TFLOP/s fp32, {_cost.H100.hbm_bytes_s / 1e12:.2f} TB/s; "
         f"H200 {_cost.H200.fp32_flops / 1e12:.0f} TFLOP/s, {_cost.H200.hbm_bytes_s / 1e12:.1f} TB/s. Model size "
         f"d = {RESNET50:,} (B = d / c blocks). **Predictions, not measurements.**", "", "## Goals", ""]
    L += [f"- [{'met' if ok else 'NOT MET'}] {g}: {v}" for g, v, ok in res["goals"]]
    L += ["", "## CUDA kernels (SASS, sm_90)", "",
          "| kernel | regs | spills | FFMA | LDS | LDG | STS | STG | DFMA | SHFL | FFMA / load |",
          "|---|" + "---:|" * 10]
    for k, v in res["cuda_kernels"].items():
        L.append(f"| {k} | {v['regs']} | {v['spill_bytes']} | {v['FFMA']} | {v['LDS']} | {v['LDG']} | {v['STS']} | "
                 f"{v['STG']} | {v['DFMA']} | {v['SHFL']} | {v['ffma_per_load']} |")
    L += ["", "## Per case (op, c, k): variant, resources, predicted fraction of peak", "",
          "`peak` = nominal flops (4 k c^2 per block) / time / fp32 peak; `BW` = fewest bytes (gradients + inverse "
          "once) / time / HBM bandwidth.", "",
          "| op | c | k | backend | variant | regs | smem | per SM | FFMA/load | GFLOP | H100 time | H100 peak | "
          "H100 BW | H200 time | H200 peak | H200 BW | bound |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"
          + "---:|" * 6 + "---|"]
    for r in res["cases"]:
        L.append(f"| {r['op']} | {r['c']} | {r['k']} | {r['backend']} | {r['kernel']} | {r.get('regs', '')} | "
                 f"{r.get('smem', '')} | {r.get('per_sm', '')} | {r.get('ffma_per_load', '')} | "
                 f"{r['flops'] / 1e9:.0f} | "
                 f"{fmt_s(r['h100_s'])} | {r['h100_peak_frac']:.0%} | {r['h100_bw_frac']:.0%} | {fmt_s(r['h200_s'])} | "
                 f"{r['h200_peak_frac']:.0%} | {r['h200_bw_frac']:.0%} | {r['h200_bound']} |")
    if res.get("triton_error"):
        L += ["", f"Triton variants not compiled: {res['triton_error'][:300]}"]
    return "\n".join(L) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for kernels_static.{md,json}")
    p.add_argument("--check", action="store_true", help="assert the static goals (CI); exit 1 when one fails")
    p.add_argument("--build-dir", default=None, help="nvcc outputs (<src>.cu.o + .ptxas.log) to reuse")
    p.add_argument("--driver", default=None, help="an emulated woodfisher_driver (for --resources)")
    p.add_argument("--no-triton", action="store_true", help="skip compiling the Triton variants")
    args = p.parse_args(argv)
    if not tool("cuobjdump"):
        print("static_model: no cuobjdump (CUDA toolkit or triton's bundled copy) found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as work:
        build_dir = args.build_dir or work
        os.makedirs(build_dir, exist_ok=True)
        build_cuda(build_dir)
        kernels = cuda_kernels(build_dir)
        grid = sorted({(c, k) for _, c, k in CASES} | {(c, k) for c in (1, 7, 64, 128, 204, 205, 230, 236, 1448, 1449)
                                                       for k in (0, 1, 4, 5, 32, 33)})
        resources = driver_resources(args.driver or build_driver(build_dir), grid)
        goals = check_goals(kernels, resources)
        triton, terr = (None, "skipped (--no-triton)") if args.no_triton else triton_variants(CASES, work)
        try:
            import triton as _t
            tver = _t.__version__
        except ImportError:
            tver = None
        nvcc = subprocess.run([os.environ.get("NVCC") or "nvcc", "--version"], capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]
        res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "toolchain": {"nvcc": nvcc, "triton": tver}, "device_models": {"H100": vars(_cost.H100),
                                                                              "H200": vars(_cost.H200)},
               "efficiency_assumed": _cost.EFFICIENCY, "cuda_kernels": kernels,
               "triton_variants": triton["rows"] if triton else None, "triton_error": terr,
               "cases": case_rows(kernels, resources, triton), "goals": [list(g) for g in goals]}
    for g, v, ok in goals:
        print(f"static_model: [{'met' if ok else 'NOT MET'}] {g}: {v}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_static.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(args.out, "kernels_static.md"), "w") as f:
            f.write(markdown(res))
        print(f"static_model: wrote {args.out}/kernels_static.md and .json")
    return 1 if args.check and not all(ok for _, _, ok in goals) else 0


if __name__ == "__main__":
    sys.exit(main())
