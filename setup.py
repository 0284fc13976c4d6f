"""Build dualres_ext._C with torch.utils.cpp_extension.

One extension module. C++ sources follow one layout: ``csrc/*.cpp`` (the op
schemas and module init), ``csrc/<family>/cpu/*.cpp`` (CPU kernels) and
``csrc/<family>/cuda/*.cu`` (CUDA kernels, only when CUDA is built).

The build is portable by default: the compiler targets its baseline (x86-64: SSE2 only), and the
CPU kernels pick AVX2 or AVX-512 code at run time by CPU detection (csrc/common/cpu_kernels.h;
DUALRES_CPU_KERNELS=scalar|avx2|avx512 at run time forces a set). A wheel built anywhere runs on
any x86-64 CPU, and the results do not depend on the set used.

Environment switches:
  FORCE_CUDA=1        build the CUDA kernels; fail if no toolkit is found
  DUALRES_NO_CUDA=1   never build the CUDA kernels
  DUALRES_NATIVE=1    also tune everything else for this CPU (-march=native, host code of .cu files
                      included); the binary may then fail with an illegal instruction elsewhere
  DUALRES_PORTABLE=1  accepted for compatibility and ignored: portable is the default
  TORCH_CUDA_ARCH_LIST  as usual; defaults to the local GPU, or "9.0+PTX" without one
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _is_toolkit(prefix):
    return os.path.exists(os.path.join(prefix, "bin", "nvcc")) and os.path.exists(
        os.path.join(prefix, "include", "cuda_runtime.h")
    )


def _find_cuda_home():
    """CUDA_HOME as torch would find it, plus the usual install prefixes torch does not look at.

    An ``nvcc`` on PATH may be a wrapper script outside any toolkit, so a candidate prefix only
    counts when it holds both bin/nvcc and include/cuda_runtime.h.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def _pip_cuda_include_dirs():
    """Headers shipped in the nvidia-* wheels that torch's CUDA headers include (cusparse.h, ...).

    A system toolkit can lack some of them (e.g. cusparse.h), while torch's own wheel always
    brings them under site-packages/nvidia/<pkg>/include.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


cuda_home = None if _flag("DUALRES_NO_CUDA") else _find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
    os.environ.setdefault("CUDA_HOME", cuda_home)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None
if _flag("FORCE_CUDA") and not with_cuda:
    sys.exit(
        "FORCE_CUDA=1 but no CUDA build is possible: "
        f"CUDA toolkit={cuda_home!r}, torch.version.cuda={torch.version.cuda!r}"
    )
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # Without a GPU torch would compile for every architecture it knows (slow): build for Hopper
    # (H100/H200) plus PTX, which newer GPUs compile at load time.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


sources = _rel(
    glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "*", "cpu", "*.cpp"))
)
cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*", "cuda", "*.cu")))

# No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 for torch 2.14).
# -ffp-contract=off: GCC would otherwise fuse a * b + c into an FMA wherever the target has one,
# so the AVX2/AVX-512 versions of a kernel would round differently from the baseline one.
native = _flag("DUALRES_NATIVE")
cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
define_macros = []
if native:
    cxx_flags.append("-march=native")
    define_macros.append(("DUALRES_NATIVE", "1"))
include_dirs = [os.path.join(ROOT, "csrc")]

nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-ffp-contract=off"]
if native:
    # Host code in .cu files shares inline helpers with the C++ files: the same -march gives both
    # the same definitions.
    nvcc_flags += ["-Xcompiler", "-march=native"]

if with_cuda:
    include_dirs += _pip_cuda_include_dirs()
    define_macros.append(("DUALRES_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "dualres_ext._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "dualres_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

print(
    f"dualres_ext: building {'CPU + CUDA' if with_cuda else 'CPU only'} "
    f"({len(ext.sources)} translation units, CUDA_HOME={cuda_home})",
    file=sys.stderr,
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
