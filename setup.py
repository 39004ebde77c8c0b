"""Build of torchrec_fiited: the Python package, its Hydra configs and the native ops ``_C*.so``.

Metadata and dependencies are in ``pyproject.toml``; this file adds what it cannot declare: the
C++/CUDA extension, built with torch's ``BuildExtension`` against the torch that is installed, and
the copy of ``conf/`` into the package (``torchrec_fiited/conf``), so an installed app finds its
configs. Install with::

    pip install --no-build-isolation .          # a user install (wheel: python -m build --no-isolation)
    pip install --no-build-isolation -e .       # contributors (`make ext`): the .so is built in place

``--no-build-isolation`` is required: the extension must be compiled against the torch it will
run with (an isolated build would fetch a different torch from the index, the CUDA one on Linux).

The CPU kernels are always built; the CUDA kernels only when the installed torch is a CUDA build
and a CUDA toolkit is found. Without a C++ compiler the package installs without the native ops
(the module then runs the PyTorch reference ops and warns once on import).

Environment:
    FIITED_EXT_CUDA: "0" never builds the CUDA part, "1" requires it (fails without a toolkit).
    FIITED_EXT_MARCH: value of ``-march`` for the CPU kernels ("native" by default, right for a
        build on the machine that runs it); "" leaves the compiler's default (portable wheels).
    MAX_JOBS: parallel compile jobs (torch's BuildExtension with ninja).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CPU_SOURCES = [
    "cuda/fiited_ops.cpp", "cuda/fiited_cpu.cpp",
    "cuda/fiited_hash_ops.cpp", "cuda/fiited_hash_cpu.cpp", "cuda/fiited_sketch_cpu.cpp",
    "cuda/fiited_init_cpu.cpp", "cuda/fiited_keys_cpu.cpp",
]
CUDA_SOURCES = [
    "cuda/fiited_cuda.cu", "cuda/fiited_cuda_host.cpp",
    "cuda/fiited_hash_cuda.cu", "cuda/fiited_hash_cuda_host.cpp",
]
CONF_DIR = "conf"  # top-level in the repository, torchrec_fiited/conf in the installed package


def _cuda_wanted() -> bool:
    """True when the CUDA kernels should be part of the build."""
    import torch
    from torch.utils import cpp_extension

    setting = os.environ.get("FIITED_EXT_CUDA", "")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if setting == "1" and not possible:
        raise SystemExit(
            f"[torchrec_fiited] FIITED_EXT_CUDA=1 needs a CUDA torch and a CUDA toolkit; got "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return possible and setting != "0"


def _extensions():
    """The ``torchrec_fiited._C`` extension, or none (with a message) without a C++ compiler."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"[torchrec_fiited] no C++ compiler ({compiler!r} is not on PATH): the native ops are "
              "not built; torchrec_fiited will use the PyTorch reference ops")
        return []
    from torch.utils import cpp_extension

    march = os.environ.get("FIITED_EXT_MARCH", "native")
    cxx = ["-O3", "-fopenmp"] + ([f"-march={march}"] if march else [])
    depends = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cuda").glob("*.h"))
    if not _cuda_wanted():
        print("[torchrec_fiited] building the native ops: CPU kernels")
        return [cpp_extension.CppExtension(
            "torchrec_fiited._C", CPU_SOURCES, depends=depends,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )]
    print("[torchrec_fiited] building the native ops: CPU + CUDA kernels")
    return [cpp_extension.CUDAExtension(
        "torchrec_fiited._C", CPU_SOURCES + CUDA_SOURCES, depends=depends,
        define_macros=[("FIITED_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )]


class BuildPyWithConf(build_py):
    """build_py that also ships ``conf/**.yaml`` as ``torchrec_fiited/conf`` in the package.

    The repository keeps the configs at the top level (next to ``launchers/``); an editable install
    reads them there, so only a regular build copies them.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "torchrec_fiited" / "conf"
        for src in sorted((ROOT / CONF_DIR).rglob("*.yaml")):
            dst = target / src.relative_to(ROOT / CONF_DIR)
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))


def _cmdclass():
    from torch.utils import cpp_extension

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension; an editable build keeps its objects in ``build/temp``.

        An editable install (``make ext``) would otherwise compile in a fresh temp dir each time;
        with a fixed one, ninja recompiles only the sources that changed.
        """

        def finalize_options(self) -> None:
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                self.build_temp = str(ROOT / "build" / "temp")

    return {"build_py": BuildPyWithConf, "build_ext": BuildExt}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
