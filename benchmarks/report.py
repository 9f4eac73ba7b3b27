"""Markdown tables and the target check for a side-by-side result (see side_by_side.py)."""
from __future__ import annotations

from typing import Dict, List, Optional

from benchmarks._common import human_time

GPU_TARGETS = {
    "fused_pct_peak": 50.0,        # % of measured float32 peak, c in {64, 128}, m >= 64
    "fused_vs_einsum": 20.0,       # x faster than (b) at the same shapes
    "triton_vs_cuda": 1.5,         # Triton time / CUDA time at most
    "stream_k1_pct_bw": 80.0,      # % of measured bandwidth for k = 1
}


def _fmt(x: Optional[float], spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _pct(rec: Dict, peaks: Dict):
    if "tflops" not in rec:
        return None, None
    return (100.0 * rec["tflops"] / peaks["fp32_peak_tflops"],
            100.0 * rec["gbs"] / peaks["mem_bandwidth_gbs"])


def _speedups(rec: Dict) -> str:
    sv = rec.get("speedup_vs", {})
    names = {"ref_loop": "a", "einsum_baddbmm": "b", "torch": "c"}
    return " ".join(f"{names[k]}:{v:.3g}x" for k, v in sv.items()) or "-"


def _row(rec: Dict, peaks: Dict, first: List[str]) -> str:
    if "error" in rec:
        return "| " + " | ".join(first + [f"not run: {rec['error'][:80]}"] + ["-"] * 7) + " |"
    pf, pb = _pct(rec, peaks)
    return "| " + " | ".join(first + [
        human_time(rec["time_full_s"]), rec["how"], _fmt(rec["tflops"] * 1e3, ".4g"), _fmt(pf, ".1f"),
        _fmt(rec["gbs"], ".4g"), _fmt(pb, ".1f"), _speedups(rec), _fmt(rec.get("rel_err_vs_float64"), ".2e")]) + " |"


HEAD = ("| time (full d) | how | GFLOP/s | % peak | GB/s | % BW | speed-up vs a / b / c | rel. err vs fp64 |")


def _peak_detail(result: Dict) -> str:
    if "peaks_end_of_run" not in result:
        return ""
    a, b = result["peaks_start_of_run"], result["peaks_end_of_run"]
    return (f", the better of the start ({a['fp32_peak_tflops'] * 1e3:.4g} GFLOP/s, {a['mem_bandwidth_gbs']:.4g} GB/s)"
            f" and end ({b['fp32_peak_tflops'] * 1e3:.4g} GFLOP/s, {b['mem_bandwidth_gbs']:.4g} GB/s) of the run")


def make_markdown(result: Dict) -> str:
    """The human-readable side-by-side report."""
    info, peaks, cfg = result["device"], result["peaks"], result["config"]
    out = [f"# Kernel benchmarks: {info['device_name']} ({info['device_type']})", "",
           f"Mode `{cfg['mode']}`, torch {info['torch']}, {result['date']}. "
           f"Nominal model size d = {cfg['d']:,} parameters"
           + ("" if cfg["d"] >= 25_000_000 else " (scaled down from ResNet-50's 25.5 M for this machine)")
           + ".", "",
           f"Measured on this machine in the same run: float32 peak **{peaks['fp32_peak_tflops'] * 1e3:.4g} GFLOP/s** "
           f"(sgemm n = {peaks['sgemm_n']}, TF32 off), memory bandwidth **{peaks['mem_bandwidth_gbs']:.4g} GB/s** "
           f"(copy, read + write)" + _peak_detail(result) + ". Percentages and the roofline use these.", ""]
    if result.get("notes"):
        out += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    out += ["Times are medians after warm-up ("
            + ("CUDA events" if info["device_type"] == "cuda" else "perf_counter") + ") for the whole "
            "model (all blocks of d). `how` says whether the time was measured on all blocks or "
            "extrapolated linearly from fewer blocks / gradients. FLOP/s and GB/s use the nominal "
            "counts in the JSON (`flops_per_block`, `bytes_per_block`) over the measured run. "
            "Errors: max over sampled blocks of ||F^-1 V - ref||_F / ||ref||_F against a float64 "
            "Cholesky solve of the dense F (4 random probes).", "",
            "## Build of the blockwise inverse from m gradients", "",
            "Summary (time for all blocks of d):", "", compact_table(result),
            "| c | m | method " + HEAD, "|---" * 11 + "|"]
    for r in (x for x in result["records"] if x["section"] == "build"):
        out.append(_row(r, peaks, [str(r["c"]), str(r["m"]), r["method"]]))
    out += ["", "Methods: " + "; ".join(sorted({f"`{r['method']}` = {r['label']}" for r in result["records"]
                                              if r["section"] == "build" and "label" in r})) + ".", "",
            "## Streaming: k-buffered updates vs one einsum + baddbmm per gradient", "",
            "Time is per call (k gradients); speed-up compares the time per gradient.", "",
            "| c | k | method " + HEAD, "|---" * 11 + "|"]
    for r in (x for x in result["records"] if x["section"] == "stream"):
        out.append(_row(r, peaks, [str(r["c"]), str(r.get("k")), r["method"]]))
    out += ["", "## OBS statistics and update over all blocks", "",
            "| c | m | form | op | method " + HEAD, "|---" * 13 + "|"]
    for r in (x for x in result["records"] if x["section"] == "stats"):
        out.append(_row(r, peaks, [str(r["c"]), str(r.get("m")), r.get("form", "-"), r.get("op", "-"),
                                   r.get("method", "-")]))
    out += ["", "## GPU targets", ""]
    tg = result.get("targets") or []
    if not tg:
        out.append("Not evaluated: the targets are for an H100 in float32 and need the fused "
                   "CUDA / Triton kernels on a GPU; run `python -m benchmarks.side_by_side --full` there.")
    else:
        out += ["| target | goal | measured | met |", "|---|---|---|---|"]
        out += [f"| {t['target']} | {t['goal']} | {t['value']} | {'yes' if t['met'] else 'NO'} |" for t in tg]
    return "\n".join(out) + "\n"


def evaluate_targets(result: Dict) -> List[Dict]:
    """The issue's float32 GPU targets, from the records of a CUDA run."""
    if result["device"]["device_type"] != "cuda":
        return []
    peaks, recs = result["peaks"], result["records"]
    build = {(r["c"], r["m"], r["method"]): r for r in recs if r["section"] == "build" and "error" not in r}
    out = []
    for (c, m, meth), r in sorted(build.items()):
        if meth not in ("cuda", "triton") or c not in (64, 128) or m < 64:
            continue
        pf = 100 * r["tflops"] / peaks["fp32_peak_tflops"]
        out.append({"target": f"{meth} build c={c} m={m}: % of fp32 peak", "goal": ">= 50%",
                    "value": f"{pf:.1f}%", "met": pf >= GPU_TARGETS["fused_pct_peak"]})
        b = build.get((c, m, "einsum_baddbmm"))
        if b:
            s = b["time_full_s"] / r["time_full_s"]
            out.append({"target": f"{meth} build c={c} m={m}: speed-up vs (b)", "goal": ">= 20x",
                        "value": f"{s:.1f}x", "met": s >= GPU_TARGETS["fused_vs_einsum"]})
    for (c, m, meth), r in sorted(build.items()):
        cu = build.get((c, m, "cuda"))
        if meth == "triton" and cu:
            q = r["time_full_s"] / cu["time_full_s"]
            out.append({"target": f"triton/cuda time c={c} m={m}", "goal": "<= 1.5",
                        "value": f"{q:.2f}", "met": q <= GPU_TARGETS["triton_vs_cuda"]})
    ridge = peaks["fp32_peak_tflops"] * 1e12 / (peaks["mem_bandwidth_gbs"] * 1e9)
    for r in recs:
        if r["section"] != "stream" or "error" in r or r["method"] not in ("cuda", "triton"):
            continue
        if r["k"] == 1:
            pb = 100 * r["gbs"] / peaks["mem_bandwidth_gbs"]
            out.append({"target": f"{r['method']} stream k=1 c={r['c']}: % of bandwidth", "goal": ">= 80%",
                        "value": f"{pb:.1f}%", "met": pb >= GPU_TARGETS["stream_k1_pct_bw"]})
        elif r["k"] >= 32:
            ai = r["flops_per_block"] / r["bytes_per_block"]
            pf = 100 * r["tflops"] / peaks["fp32_peak_tflops"]
            pb = 100 * r["gbs"] / peaks["mem_bandwidth_gbs"]
            out.append({"target": f"{r['method']} stream k={r['k']} c={r['c']}: compute-bound",
                        "goal": f"intensity {ai:.1f} > ridge {ridge:.1f} and % peak > % BW",
                        "value": f"{pf:.1f}% peak, {pb:.1f}% BW", "met": ai > ridge and pf > pb})
    return out


def compact_table(result: Dict) -> str:
    """One row per build shape: whole-model time of every method and the key ratios."""
    recs = [r for r in result["records"] if r["section"] == "build"]
    order = [m for m in ("ref_loop", "einsum_baddbmm", "torch", "lowrank", "cuda", "triton")
             if any(r["method"] == m for r in recs)]
    names = {"ref_loop": "(a) loop", "einsum_baddbmm": "(b) einsum+baddbmm", "torch": "(c) torch",
             "lowrank": "low-rank", "cuda": "CUDA", "triton": "Triton"}
    out = ["| c | m | " + " | ".join(names[m] for m in order) + " | best | best vs (a) | best vs (b) |",
           "|---" * (len(order) + 5) + "|"]
    for c, m in dict.fromkeys((r["c"], r["m"]) for r in recs):
        row = {r["method"]: r for r in recs if (r["c"], r["m"]) == (c, m) and "time_full_s" in r}
        cells = [human_time(row[k]["time_full_s"]) + ("*" if row[k]["scaled"] else "") if k in row else "n/a"
                 for k in order]
        fast = [k for k in row if k not in ("ref_loop", "einsum_baddbmm")]
        if fast:
            best = min(fast, key=lambda k: row[k]["time_full_s"])
            sv = row[best].get("speedup_vs", {})
            tail = [names[best], _fmt(sv.get("ref_loop"), ".3g") + "x", _fmt(sv.get("einsum_baddbmm"), ".3g") + "x"]
        else:
            tail = ["-", "-", "-"]
        out.append(f"| {c} | {m} | " + " | ".join(cells + tail) + " |")
    return "\n".join(out) + "\n\n\\* extrapolated from fewer blocks (and/or gradients) to all d / c blocks.\n"
