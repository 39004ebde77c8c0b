"""Build the native FIITED ops in place, as ``torchrec_fiited/_C*.so``.

Usage (the Makefile's ``ext`` target runs this)::

    .venv/bin/python cuda/setup_ext.py

It builds against the torch already installed (no build isolation, no network) with ninja when it
is on PATH, and skips the build when the library is newer than every source. The CUDA kernels are
added only when the installed torch is a CUDA build and a CUDA toolkit is found; a CPU-only torch
gets the CPU kernels alone (``make nvcc-check`` still compiles the CUDA kernels). Without a C++
compiler it builds nothing and says so (the ops then fall back to the reference and their tests
skip); a compiler that fails is an error.

Environment:
    FIITED_EXT_CUDA: "0" never builds the CUDA part, "1" requires it (fails without a toolkit).
    FIITED_EXT_MARCH: value of ``-march`` for the CPU kernels ("native" by default: the library is
        built in place on the machine that runs it); "" leaves the compiler's default.
"""

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "cuda"
CPU_SOURCES = ["cuda/fiited_ops.cpp", "cuda/fiited_cpu.cpp"]
CUDA_SOURCES = ["cuda/fiited_cuda.cu", "cuda/fiited_cuda_host.cpp"]


def _cuda_wanted() -> bool:
    """True when the CUDA kernels should be part of the build."""
    from torch.utils import cpp_extension

    import torch

    setting = os.environ.get("FIITED_EXT_CUDA", "")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if setting == "1" and not possible:
        raise SystemExit(
            f"FIITED_EXT_CUDA=1 needs a CUDA torch and a CUDA toolkit; got torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return possible and setting != "0"


def _extension(with_cuda: bool):
    from torch.utils import cpp_extension

    march = os.environ.get("FIITED_EXT_MARCH", "native")
    cxx = ["-O3", "-fopenmp"] + ([f"-march={march}"] if march else [])
    depends = [str(p.relative_to(ROOT)) for p in CUDA_DIR.glob("*.h")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "torchrec_fiited._C", CPU_SOURCES, depends=depends,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CUDAExtension(
        "torchrec_fiited._C", CPU_SOURCES + CUDA_SOURCES, depends=depends,
        define_macros=[("FIITED_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


def main() -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"[torchrec_fiited] no C++ compiler ({compiler!r} is not on PATH): native ops not "
              "built; torchrec_fiited uses the reference ops and the native tests skip")
        return
    os.chdir(ROOT)
    from setuptools import setup
    from torch.utils import cpp_extension

    with_cuda = _cuda_wanted()
    print(f"[torchrec_fiited] building torchrec_fiited/_C ({'CPU + CUDA' if with_cuda else 'CPU'})")
    setup(
        name="torchrec_fiited_native",
        ext_modules=[_extension(with_cuda)],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
        script_args=["-q", "build_ext", "--inplace", "--build-temp", "build/ext"] + sys.argv[1:],
    )


if __name__ == "__main__":
    main()
