"""Versions and device facts for the gpu_check summary (never fails: prints what it can)."""
import importlib
import json
import platform
import shutil
import sys

MODULES = ("torch", "triton", "numpy", "setuptools", "wheel", "ninja", "pytest", "xdist", "pytest_timeout",
           "pytest_benchmark", "torchvision", "hypothesis")
TOOLS = ("nvcc", "ninja", "compute-sanitizer", "cuobjdump", "c++filt", "gcc", "g++", "nvidia-smi")


def probe():
    out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    for mod in MODULES:
        try:
            out[mod] = getattr(importlib.import_module(mod), "__version__", "present")
        except Exception as exc:  # any import failure is a fact to report
            out[mod] = f"MISSING ({type(exc).__name__})"
    try:
        import torch
        from torch.utils import cpp_extension

        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            out["device"] = {"name": p.name, "cc": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                             "mem_gib": round(p.total_memory / 2**30, 1),
                             "smem_per_block_optin": getattr(p, "shared_memory_per_block_optin", None),
                             "smem_per_sm": getattr(p, "shared_memory_per_multiprocessor", None),
                             "l2_bytes": getattr(p, "L2_cache_size", None),
                             "regs_per_sm": getattr(p, "regs_per_multiprocessor", None),
                             "arch_list": torch.cuda.get_arch_list()}
        out["CUDA_HOME"] = cpp_extension.CUDA_HOME
    except Exception as exc:
        out["torch_error"] = repr(exc)
    for tool in TOOLS:
        out["which_" + tool] = shutil.which(tool)
    return out


if __name__ == "__main__":
    print(json.dumps(probe(), indent=1))
