"""benchmarks/side_by_side.py's pipeline with a first-run profile that fits ~2 minutes on an
H200: no paper loop (a), 5 repeats, d = GFR_D (default 2^22) parameters, target shapes first.

    python sbs_profile.py OUT_DIR BUDGET_SECONDS

Writes kernels_cuda.json / kernels_cuda.md to OUT_DIR after every section (partial results
survive a timeout); the JSON names the device. Extra records (section "path") compare the CUDA
extension's shared-memory and tiled kernels at the same shapes. GFR_SBS_DEVICE=cpu runs the
same control flow on the CPU (dry runs).
"""
import datetime
import itertools
import json
import os
import sys
import time

# the repository root is on PYTHONPATH (scripts/gpu_check.sh exports it): benchmarks is a package
import torch

from benchmarks import _common as cm
from benchmarks import side_by_side as sbs
from benchmarks.bench_build import build_methods, make_grads, run_build
from benchmarks.bench_stream_stats import run_stats, run_streaming
from benchmarks.report import evaluate_targets, make_markdown
from woodfisher_kernels import _cuda

BUILD_SHAPES = [(64, 64), (128, 128), (256, 256), (64, 16), (128, 16), (256, 64)]


class Run:
    def __init__(self, out_dir, budget):
        self.out_dir, self.budget, self.t0 = out_dir, budget, time.time()
        cm.configure_precision()
        self.device = cm.pick_device(os.environ.get("GFR_SBS_DEVICE", "cuda"))
        self.d = int(os.environ.get("GFR_D", 1 << 22))
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 2 * 2**30
        self.cfg = dict(mode="gpu-check", d=self.d, damp=1e-5, grad_scale=1e-2, mem_bytes=0.6 * free, repeats=5,
                        warmup=1, call_budget_s=1.0, ref_max_blocks=8, probe_blocks=1, check_error=True,
                        skip=("ref_loop",))
        info = cm.device_info(self.device)
        print(f"[sbs] device={info['device_name']} d={self.d:,} budget={budget:.0f}s", flush=True)
        self.peaks = cm.measure_peaks(self.device, quick=self.device.type == "cpu")
        print(f"[sbs] peak {self.peaks['fp32_peak_tflops']:.2f} TFLOP/s fp32 (sgemm, TF32 off), "
              f"copy {self.peaks['mem_bandwidth_gbs']:.0f} GB/s", flush=True)
        self.result = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "device": info, "peaks": self.peaks, "peaks_start_of_run": self.peaks,
                       "peaks_end_of_run": self.peaks, "config": self.cfg,
                       "notes": [f"scripts/gpu_check.sh profile: side_by_side.py pipeline, shorter shape list, no "
                                 f"paper loop (a), 5 repeats; d scaled to {self.d} parameters."],
                       "records": [], "path_records": [], "skipped": [], "wall_s": None}

    def left(self):
        return self.budget - (time.time() - self.t0)

    def save(self):
        self.result["targets"] = evaluate_targets(self.result)
        self.result["wall_s"] = round(time.time() - self.t0, 1)
        with open(os.path.join(self.out_dir, "kernels_cuda.json"), "w") as f:
            json.dump(self.result, f, indent=1)
        try:
            md = make_markdown(self.result)
        except Exception as exc:  # never lose the JSON to a report bug
            md = f"make_markdown failed: {exc!r}\n"
        with open(os.path.join(self.out_dir, "kernels_cuda.md"), "w") as f:
            f.write(md)

    def section(self, label, need_s, fn):
        if self.left() < need_s:
            self.result["skipped"].append(label)
            return
        self.result["records"] += fn()
        self.save()

    def cuda_paths(self, c, m):
        """CUDA extension: shared-memory vs tiled kernel on the same build, TFLOP/s, each with the
        default one-warp K x K Cholesky and the experimental block-wide one ("+blockchol":
        WOODFISHER_CUDA_CHOL=block, read by the launcher at every call; the same bits)."""
        blocks = max(1, min(self.d // c, int(self.cfg["mem_bytes"] // (8 * (c * c + m * c)))))
        g = make_grads(blocks, m, c, self.device, self.cfg["grad_scale"])
        row = {"section": "path", "c": c, "m": m, "blocks": blocks}
        for path, chol in itertools.product(("shared", "tiled"), ("warp", "block")):
            if path == "shared" and c > _cuda.limits()[0]:
                continue
            key = path if chol == "warp" else f"{path}+blockchol"
            os.environ["WOODFISHER_CUDA_CHOL"] = chol
            try:
                t = cm.time_call(lambda p=path: _cuda.fisher_inverse(g, self.cfg["damp"], float(m), p), self.device,
                                 repeats=5, warmup=1)
                row[key] = {"median_s": t["median_s"],
                            "tflops": cm.seq_flops(m, c) * blocks / t["median_s"] / 1e12}
            except Exception as exc:
                row[key] = {"error": repr(exc)[:200]}
            finally:
                os.environ.pop("WOODFISHER_CUDA_CHOL", None)
        print(f"  [path] c={c} m={m}: {row}", flush=True)
        return row


def progress(rec):
    msg = rec.get("error") or f"{cm.human_time(rec['time_full_s'])} ({rec['how']})"
    shape = " ".join(f"{k}={rec[k]}" for k in ("c", "m", "k", "op") if k in rec)
    extra = f" {rec['tflops']:.2f} TFLOP/s {rec['gbs']:.0f} GB/s" if "tflops" in rec else ""
    print(f"  [{rec['section']}] {shape} {rec.get('method', '')}: {msg}{extra}", flush=True)


def main(out_dir, budget):
    run = Run(out_dir, budget)
    dev, d, cfg = run.device, run.d, run.cfg
    methods = build_methods(dev, cfg["damp"])
    for shape in BUILD_SHAPES:
        run.section(f"build {shape}", 30, lambda s=shape: run_build([s], d, cfg, dev, methods=methods,
                                                                   progress=progress))
    for c in (64, 128, 256):
        run.section(f"stream c={c}", 20, lambda c=c: run_streaming([c], [1, 16, 128], d, cfg, dev, progress=progress))
    for st in [(128, 128, "dense"), (64, 64, "dense")]:
        run.section(f"stats {st}", 12, lambda st=st: run_stats([st], d, cfg, dev, progress=progress))
    if _cuda.AVAILABLE and dev.type == "cuda":
        for c, m in ((64, 64), (128, 128), (200, 64), (512, 64)):
            if run.left() < 8:
                run.result["skipped"].append(f"path c={c} m={m}")
                continue
            run.result["path_records"].append(run.cuda_paths(c, m))
            run.save()
    if run.left() > 6:
        end = cm.measure_peaks(dev, quick=dev.type == "cpu")
        run.result["peaks_end_of_run"] = end
        run.result["peaks"] = sbs.best_peaks(run.peaks, end)
    run.save()
    for t in run.result["targets"]:
        print(f"[sbs] target {t['target']}: {t['value']} (goal {t['goal']}) {'met' if t['met'] else 'NOT MET'}")
    print(f"[sbs] done in {time.time() - run.t0:.0f}s; skipped: {run.result['skipped'] or 'nothing'}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
