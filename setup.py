"""Builds the `lowbit._C` extension.

* The C++ CPU kernels (csrc/cpu/*.cpp) are always built.
* The CUDA kernels (csrc/cuda/*.cu) are built when torch is a CUDA build and nvcc is
  found. `LOWBIT_BUILD_CUDA=0` forces a CPU-only build. The decision never looks at
  `torch.cuda.is_available()`: a build machine usually has no GPU.
* Architectures: sm_80, sm_89 and sm_90a by default; `TORCH_CUDA_ARCH_LIST` overrides.

What was built is recorded in `lowbit/_build_config.py`, which `lowbit info` reads.
"""

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.9;9.0a"

# torch.utils.cpp_extension resolves CUDA_HOME when it is imported; point it at the
# toolkit that has nvcc before that happens (it otherwise guesses /usr/local).
if "CUDA_HOME" not in os.environ:
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            break

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def cuda_build_decision():
    """(build_cuda, reason) without ever touching a GPU."""
    if os.environ.get("LOWBIT_BUILD_CUDA", "1") == "0":
        return False, "LOWBIT_BUILD_CUDA=0 was set at build time"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return True, f"built with nvcc from {CUDA_HOME}"


def cutlass_include_dirs():
    # A machine that cannot reach the package registry (the GPU machines) brings the headers
    # along: LOWBIT_CUTLASS_DIR=<dir holding cutlass/ and cute/> (see scripts/gpu_pass.sh).
    carried = os.environ.get("LOWBIT_CUTLASS_DIR")
    if carried:
        return [os.path.abspath(carried)]
    try:
        import cutlass_library
    except ImportError:
        return []
    source = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    return [os.path.join(source, "include"), os.path.join(source, "tools", "util", "include")]


def nvidia_wheel_include_dirs():
    # torch's CUDA 13 wheels keep the runtime headers (cuda_fp8.h, ...) in nvidia/cu13.
    site = sysconfig.get_paths()["purelib"]
    return [d for d in glob.glob(os.path.join(site, "nvidia", "cu1*", "include")) if os.path.isdir(d)]


def cxx_std():
    return "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"


def extension():
    build_cuda, reason = cuda_build_decision()
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is a header template that is only parallel when compiled with
    # OpenMP (torch's CPU backend); without it every CPU kernel here silently runs on one thread.
    cxx_flags = ["-O3", cxx_std(), "-fvisibility=hidden", "-DLOWBIT_NAMESPACE=lowbit", "-fopenmp"]
    macros = []
    if not build_cuda:
        return CppExtension(
            "lowbit._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            define_macros=macros,
        ), False, reason, []

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").split(";")
    cutlass = cutlass_include_dirs()
    if not cutlass:
        print("lowbit: nvidia-cutlass is not installed; `pip install nvidia-cutlass==4.2.0.0`", file=sys.stderr)
        raise SystemExit(1)
    nvcc_flags = [
        "-O3",
        cxx_std(),
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-lineinfo",
        # Registers and spills per kernel land in the build log; tests/test_cuda_build.py
        # reads the same numbers back from the built .so with cuobjdump.
        "-Xptxas=-v",
        "-DLOWBIT_WITH_CUDA=1",
        "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1",
    ]
    return CUDAExtension(
        "lowbit._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs + cutlass + nvidia_wheel_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + ["-DLOWBIT_WITH_CUDA=1"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        define_macros=macros,
    ), True, reason, archs


ext, built_cuda, cuda_reason, cuda_archs = extension()

with open(os.path.join(ROOT, "lowbit", "_build_config.py"), "w") as f:
    f.write("# Written by setup.py at build time; not under version control.\n")
    f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
    f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
    f.write(f"BUILT_WITH_CUDA = {built_cuda!r}\n")
    f.write(f"CUDA_REASON = {cuda_reason!r}\n")
    f.write(f"CUDA_ARCHS = {cuda_archs!r}\n")
    f.write(f"NVCC = {shutil.which('nvcc', path=os.path.join(CUDA_HOME, 'bin')) if CUDA_HOME else None!r}\n")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
