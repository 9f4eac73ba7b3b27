"""summary.txt for scripts/gpu_check.sh from the work folder argv[1]: stage table, device and
toolchain, ptxas report, test results, driver / sanitizer logs, benchmark JSONs. Best effort:
an unreadable section says so and the rest still prints."""
import glob
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

W = sys.argv[1]
LINES = []


def say(*parts):
    LINES.append(" ".join(str(x) for x in parts))


def read(name):
    try:
        with open(os.path.join(W, name), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def device_section():
    env = json.loads(read("env.json") or "{}")
    dev = env.get("device") or {}
    dry = " (DRY RUN on the CPU: control flow only)" if os.environ.get("GPU_CHECK_DRY_RUN") == "1" else ""
    say(f"device : {dev.get('name', 'NO CUDA DEVICE')}{dry} cc {dev.get('cc', '?')}, {dev.get('sms', '?')} SMs, "
        f"{dev.get('mem_gib', '?')} GiB, smem optin {dev.get('smem_per_block_optin', '?')} B, "
        f"L2 {dev.get('l2_bytes', '?')} B")
    say(f"stack  : python {env.get('python')} torch {env.get('torch')} (cuda {env.get('torch_cuda')}) "
        f"triton {env.get('triton')} numpy {env.get('numpy')}")
    say(f"tools  : nvcc {env.get('which_nvcc')} sanitizer {env.get('which_compute-sanitizer')} "
        f"xdist {env.get('xdist')} pytest-timeout {env.get('pytest_timeout')} torchvision {env.get('torchvision')}")
    nv = read("nvidia_smi.txt").strip().splitlines()
    if nv:
        say("gpu    :", nv[0][:150])


def stages_section():
    say("stages (status, rc, seconds, note)")
    for line in read("stages.tsv").splitlines():
        parts = line.split("\t")
        if len(parts) == 5:
            say(f"  {parts[0]:10s} {parts[1]:8s} rc={parts[2]:4s} {parts[3]:>4s}s  {parts[4]}")


def build_section():
    say("build")
    log = read("build.log") + read("build_fallback.log")
    say("  extension loads:", read("ext_check.txt").strip() or "not checked")
    regs, cur, spill = [], None, ""
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur, spill = m.group(1), ""
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m and cur:
            spill = f"stack {m.group(1)} B, spill {m.group(2)} B"
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            regs.append((cur, f"{m.group(1)} regs, {spill}"))
            cur = None
    try:
        names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in regs), capture_output=True,
                               text=True).stdout.splitlines()
    except OSError:
        names = []
    seen = set()
    for (mangled, desc), name in zip(regs, names if len(names) == len(regs) else [r[0] for r in regs]):
        name = re.sub(r"woodfisher::detail::\(anonymous namespace\)::", "", name)
        if (name, desc) not in seen:
            seen.add((name, desc))
            say(f"  ptxas {name[:75]:75s} {desc}")
    for err in [ln for ln in log.splitlines() if re.search(r"\berror\b|Error:|FAILED", ln)][:8]:
        say("  !", err.strip()[:160])


def tests_section():
    say("tests")
    for fn in ("junit_triton.jsonl", "junit_gpu.jsonl", "junit_gpu_ops.jsonl"):
        recs = []
        for line in read(fn).splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
        counts = {}
        for r in recs:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        say(f"  {fn[6:-6]:12s} results as they came: {counts or 'none'}")
        for r in [r for r in recs if r["outcome"] == "failed"][:12]:
            msg = [ln for ln in r.get("message", "").splitlines() if ln.strip()]
            say(f"    FAIL {r['nodeid']}: {(msg[-1] if msg else '')[:150]}")
    for name in ("junit_triton.xml", "junit_gpu.xml"):
        path = os.path.join(W, name)
        if not os.path.exists(path):
            say(f"  {name}: none (run cut short: see the streamed results above)")
            continue
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        say(f"  {name}: {tot['tests']} tests, {tot['failures']} failures, {tot['errors']} errors, "
            f"{tot['skipped']} skipped")


def driver_section():
    say("standalone driver and compute-sanitizer")
    drv = read("driver.log")
    if drv:
        fails = [ln for ln in drv.splitlines() if ln.rstrip().endswith("FAIL")]
        last = [ln for ln in drv.splitlines() if ln.startswith("woodfisher_driver")]
        say("  driver:", (last[-1] if last else "no result line").strip(), f"({len(fails)} FAIL lines)")
        for ln in fails[:6]:
            say("    ", ln.strip())
    for f in sorted(glob.glob(os.path.join(W, "sanitizer_*.log"))):
        txt = read(os.path.basename(f))
        summ = re.findall(r"(?:ERROR|RACECHECK|LEAK) SUMMARY:.*", txt)
        say(f"  {os.path.basename(f)}: {' | '.join(summ) if summ else 'no summary line'}")


def sbs_section():
    say("side-by-side benchmark (gpu_check profile)")
    res = json.loads(read("kernels_cuda.json") or "null")
    if not res:
        tail = [ln for ln in read("sbs.log").strip().splitlines() if ln.strip()][-3:]
        say("  no kernels_cuda.json;", " / ".join(t[:140] for t in tail))
        return
    pk = res["peaks"]
    say(f"  device {res['device'].get('device_name')}; measured peaks: fp32 sgemm {pk['fp32_peak_tflops']:.2f} "
        f"TFLOP/s, copy {pk['mem_bandwidth_gbs']:.0f} GB/s; d = {res['config']['d']:,}; wall {res.get('wall_s')} s")
    for r in res["records"]:
        if "error" in r:
            say(f"  {r['section']:6s} c={r.get('c')} {r.get('method')}: ERROR {r['error'][:100]}")
            continue
        pf, pb = 100 * r["tflops"] / pk["fp32_peak_tflops"], 100 * r["gbs"] / pk["mem_bandwidth_gbs"]
        err = r.get("rel_err_vs_float64")
        say(f"  {r['section']:6s} c={r['c']:<4} {'k' if r['section'] == 'stream' else 'm'}="
            f"{r.get('m', r.get('k'))!s:<4} {r.get('op', '')[:12]:12s} {r['method']:16s} "
            f"{r['tflops'] * 1e3:9.1f} GFLOP/s {pf:5.1f}% pk {r['gbs']:7.0f} GB/s {pb:5.1f}% bw"
            + (f"  err {err:.1e}" if err is not None else ""))
    for p in res.get("path_records", []):
        say(f"  path   c={p['c']} m={p['m']}: " + ", ".join(
            f"{k} {v['tflops']:.2f} TFLOP/s" if "tflops" in v else f"{k} {v.get('error')}"
            for k, v in p.items() if isinstance(v, dict)))
    for t in res.get("targets", []):
        say(f"    [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['value']} (goal {t['goal']})")


def _result_json(pattern: str, log: str):
    """The first result file matching ``pattern`` in the work folder, or None (the log's tail said)."""
    files = sorted(glob.glob(os.path.join(W, pattern)))
    if not files:
        tail = read(log).strip().splitlines()[-3:]
        say("  no JSON;", " / ".join(t[:120] for t in tail))
        return None
    with open(files[0]) as f:
        return json.load(f)


def r50_section():
    say("ResNet-50 one-shot step")
    r50 = _result_json("*_step_*.json", "r50.log")   # resnet50_step_<device> / smoke_step_cpu
    if r50 is None:
        return
    for run in r50["runs"]:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in run["phases_s"].items())
        say(f"  {run['setting']} ({run['api']}, {run['inverse_forms']}): total {run['total_s']:.1f} s "
            f"(target < {run.get('target_s')} s); {phases}")
        if run.get("batched_fwd_bwd_s") is not None:
            say(f"    the model's own fwd+bwd over the same samples {run['batched_fwd_bwd_s']:.2f} s: "
                f"ratio to the gradients phase {run.get('gradients_ratio') or 0:.2f} (goal >= 0.5)")


PROF_METRICS = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput",
                "Achieved Occupancy", "Theoretical Occupancy", "Registers Per Thread", "Issue Slots Busy",
                "Warp Cycles Per Issued Instruction", "No Eligible", "Executed Ipc Active")


def prof_section():
    """Key Nsight Compute metrics of the measured launches (the 2nd, 4th, ... of prof.csv)."""
    import csv
    import io
    say("Nsight Compute, CUDA build kernels (prof_case.py: c64 m64 shared, c128 m128 shared, "
        "c128 m128 tiled, c512 m64 tiled)")
    rows = [r for r in csv.reader(io.StringIO(read("prof.csv"))) if len(r) > 10]
    if len(rows) < 2:
        say("  no ncu results;", " / ".join(read("prof.log").strip().splitlines()[-3:])[:300])
        return
    head, launches = rows[0], {}
    col = {name: head.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")
           if name in head}
    for r in rows[1:]:
        launches.setdefault(r[col["ID"]], (r[col["Kernel Name"]][:40], {}))[1][r[col["Metric Name"]]] = (
            r[col["Metric Value"]] + " " + r[col["Metric Unit"]]).strip()
    for i, (lid, (kernel, metrics)) in enumerate(launches.items()):
        if i % 2 == 1:
            shown = "; ".join(f"{k} {metrics[k]}" for k in PROF_METRICS if k in metrics)
            say(f"  launch {lid} {kernel}: {shown}")


def step_section():
    say("Whole step by phase (benchmarks/step_cpu.py)")
    rep = _result_json("step_*.json", "step.log")
    if rep is None:
        return
    for model, impls in rep["models"].items():
        r = impls["after"]
        ratios = ", ".join(f"loader batch {k[len('ratio_bs'):]}: {v:.2f}" for k, v in r.items()
                           if k.startswith("ratio_bs"))
        say(f"  {model}: per-sample gradients / batched fwd+bwd {ratios} (goal >= 0.5)")
        expanded = ", ".join(f"loader batch {k[len('ratio_expanded_bs'):]}: {v:.2f}" for k, v in r.items()
                             if k.startswith("ratio_expanded_bs"))
        if expanded:
            say(f"  {model}: the same with per_sample_grads='expanded' {expanded}")
        if "grads_bs64_onechunk_s" in r:
            say(f"  {model}: all N gradients in one vmap call {r['grads_bs64_onechunk_s']:.3f} s against "
                f"{r['grads_bs64_s']:.3f} s in default chunks (loader batch 64)")
        if "ops_batched_kernels" in r:
            b, v, e = (int(r[f"ops_{k}_kernels"]) for k in ("batched", "vmap", "expanded"))
            say(f"  {model}: kernels dispatched: batched fwd+bwd {b}, vmap {v} ({v / b:.2f}x), expanded {e} "
                f"({e / b:.2f}x)")


def main():
    say(f"gpu_check summary  (elapsed {sys.argv[2] if len(sys.argv) > 2 else '?'} s)")
    say("=" * 78)
    for section in (device_section, stages_section, build_section, tests_section, driver_section, sbs_section,
                    r50_section, step_section, prof_section):
        try:
            section()
        except Exception as exc:  # one unreadable section must not hide the others
            say(f"  ({section.__name__} unreadable: {exc!r})")
        say("")
    bad = [ln.split("\t")[0] for ln in read("stages.tsv").splitlines() if "\tFAIL\t" in ln or "\tTIMEOUT\t" in ln]
    say("stages that failed or timed out:", ", ".join(bad) if bad else "none")
    say("full logs: all.tar.gz (extract with tar xzf)")
    text = "\n".join(LINES) + "\n"
    with open(os.path.join(W, "summary.txt"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
