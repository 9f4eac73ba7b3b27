"""Build of woodfisher_kernels (+ the `woodfisher` pruner package in python/).

The CUDA extension ``woodfisher_kernels._C`` is built only where torch has CUDA and
nvcc is found (compile for sm_90; override with TORCH_CUDA_ARCH_LIST). Elsewhere the
package falls back to Triton / torch on GPUs. The CPU kernel ``woodfisher_kernels._cpu_kernels``
(plain C) is built wherever a C compiler is found (WOODFISHER_NO_CPU_KERNELS=1 skips it);
without it the CPU runs the torch fallback.
"""
import glob
import os

from setuptools import Extension, find_packages, setup

CPU_KERNELS = "woodfisher_kernels._cpu_kernels"


def cuda_extensions():
    if os.environ.get("WOODFISHER_NO_CUDA", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    # csrc/*.cu are the launchers (no torch headers); bindings.cpp registers the torch ops.
    # csrc/driver and csrc/emu belong to the standalone CMake / emulator builds only.
    sources = sorted(glob.glob("csrc/*.cu")) + ["csrc/bindings.cpp"]
    # No -std flag: torch adds the standard its headers need (C++17 or C++20), and
    # no --use_fast_math: divisions and square roots stay IEEE like the torch reference.
    ext = CUDAExtension(
        name="woodfisher_kernels._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": _plain_c_kernel(BuildExtension).with_options(use_ninja=True)}


def _plain_c_kernel(build_extension_cls):
    """torch's BuildExtension wraps the compiler so that every source is compiled as C++
    (g++ -std=c++17), the CPU kernel's C file too; that kernel is built with setuptools' own
    compiler methods instead, the CUDA extension with torch's."""
    class BuildExtensions(build_extension_cls):
        def build_extension(self, ext):
            # torch sets its wrappers as instance attributes; without them the class's own apply
            keep = ext.name == CPU_KERNELS
            wrappers = {k: self.compiler.__dict__.pop(k) for k in ("compile", "_compile")
                        if keep and k in self.compiler.__dict__}
            try:
                return super().build_extension(ext)
            finally:
                self.compiler.__dict__.update(wrappers)
    return BuildExtensions


def cpu_extensions():
    """The fused CPU kernels: Woodbury build / update and the low-rank factor (csrc/cpu, plain C,
    loaded with ctypes by woodfisher_kernels/_cpu.py). Optional: without a C compiler the package installs
    without it and the CPU uses the torch fallback."""
    if os.environ.get("WOODFISHER_NO_CPU_KERNELS", "0") == "1":
        return []
    return [Extension(CPU_KERNELS, sources=["csrc/cpu/woodbury_cpu.c"],
                      depends=["csrc/cpu/woodbury_cpu_kernel.h", "csrc/cpu/lowrank_cpu_kernel.h"],
                      extra_compile_args=["-O3", "-Wno-psabi"],
                      libraries=["m"], optional=True)]


ext_modules, cmdclass = cuda_extensions()
ext_modules = cpu_extensions() + ext_modules

setup(
    name="woodfisher_kernels",
    version="0.1.0",
    description="Fast blockwise inverse-Fisher kernels and a WoodFisher (OBS) pruner for PyTorch",
    packages=(find_packages(include=["woodfisher_kernels", "woodfisher_kernels.*"])
              + ["woodfisher"] + ["woodfisher." + name for name in find_packages("python/woodfisher")]),
    package_dir={"woodfisher": "python/woodfisher"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"triton": ["triton"], "plots": ["matplotlib"], "demo": ["scikit-learn", "matplotlib"],
                    "onnx": ["onnx", "onnxscript", "onnxruntime"],
                    # hf: only the tests use transformers (tiny BERT / GPT-2 from configs); the package never imports it
                    "hf": ["transformers>=4.40,<6"],
                    "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["woodfisher=woodfisher.cli:console_main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
