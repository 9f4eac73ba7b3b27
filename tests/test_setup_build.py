"""setup.py builds the C kernel as C also where torch's BuildExtension builds the CUDA extension.

torch's BuildExtension wraps the compiler so that every source becomes C++ (g++ -std=c++17); the
C kernel's entry points then got C++ names and ctypes found none of them (seen on an H200 build).
Here the same command class (with ninja, as setup.py) builds the C kernel alone, with no CUDA
needed, into a temporary folder, and ctypes must find the three entry points in the result.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ninja() -> bool:
    from torch.utils.cpp_extension import is_ninja_available
    return is_ninja_available()


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="no C compiler")
@pytest.mark.skipif(not _ninja(), reason="no ninja: torch's BuildExtension then compiles C files as C anyway")
def test_c_kernel_keeps_its_c_names_under_torchs_build_extension(tmp_path):
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    (tmp_path / "woodfisher_kernels").mkdir()
    script = textwrap.dedent("""
        import sys
        import setuptools
        from torch.utils.cpp_extension import BuildExtension
        namespace = {"__name__": "setup_parts"}
        exec(open("setup.py").read().split("ext_modules, cmdclass =")[0], namespace)
        sys.argv = ["setup.py", "-q", "build_ext", "--inplace"]
        setuptools.setup(name="probe", ext_modules=namespace["cpu_extensions"](),
                         cmdclass={"build_ext": namespace["_plain_c_kernel"](BuildExtension)
                                   .with_options(use_ninja=True)})
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    built = glob.glob(str(tmp_path / "woodfisher_kernels" / "_cpu_kernels*"))
    assert len(built) == 1, done.stdout[-2000:]
    lib = ctypes.CDLL(built[0])
    for name in ("wf_woodbury_blocks", "wf_lowrank_blocks", "wf_best_isa"):
        assert hasattr(lib, name), name
