"""Build the CUDA ops' torch host wrappers against the installed (CPU) torch, and load them.

``make nvcc-check`` compiles the kernels with nvcc alone; the host wrappers
(``cuda/fiited_cuda_host.cpp``, ``cuda/fiited_hash_cuda_host.cpp``) include c10's CUDA headers and register the kernels with the
dispatcher, which a CPU machine could not build or load, so they would first meet a compiler on a
GPU machine. This script closes most of that gap without a GPU:

1. compiles the host wrappers with torch's flags (C++20, ``-Wall -Wextra -Werror`` on our code,
   torch's headers as system headers; the one generated c10 CUDA header a CPU wheel lacks comes
   from ``cuda/host_check/c10``), the kernels with nvcc and ``c10_cuda_stubs.cpp``;
2. links them with ``--no-undefined`` against torch's libraries and the CUDA runtime, so every
   symbol the wrappers use resolves (c10_cuda's from the stubs, which abort if ever called);
3. loads the library into a fresh Python after the native CPU ops (which define the schemas):
   registering a CUDA kernel whose C++ signature disagrees with its op's schema aborts there,
   and every op the wrappers name must end with a CUDA kernel.

It cannot run a kernel: that needs a GPU (``tests/ops/test_*::test_cuda_*``).

Usage: ``python cuda/host_check/check.py OUT_DIR [--host FILE] [--arch sm_80]``; exit status 0
when the wrappers build and register, 1 (with the compiler's or the dispatcher's message) if not.
"""

import argparse
import ast
import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import List

HERE = Path(__file__).resolve().parent
CUDA_DIR = HERE.parent
STUBS = HERE / "c10_cuda_stubs.cpp"


def _cuda_sources() -> List[Path]:
    """setup.py's CUDA_SOURCES (read, not imported: importing setup.py would run the build)."""
    tree = ast.parse((CUDA_DIR.parent / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "CUDA_SOURCES" for t in node.targets):
            return [CUDA_DIR.parent / p for p in ast.literal_eval(node.value)]
    raise SystemExit("host check: setup.py defines no CUDA_SOURCES")


# The kernels and the host files that register them, as setup.py builds them.
KERNELS = [p for p in _cuda_sources() if p.suffix == ".cu"]
HOSTS = [p for p in _cuda_sources() if p.suffix == ".cpp"]


def _torch_flags() -> List[str]:
    from torch.utils import cpp_extension

    return [f for p in cpp_extension.include_paths() for f in ("-isystem", p)]


def _run(cmd: List[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"host check: failed: {' '.join(cmd)}\n{done.stdout}{done.stderr}")


def _digest(paths: List[Path]) -> str:
    return hashlib.sha1("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()[:10]


def _object_name(source: Path) -> str:
    """The object file of ``source``: one directory serves every variant (a source from
    elsewhere, such as a test's modified copy, gets its own object)."""
    ours = source.resolve().parent in (CUDA_DIR, HERE)
    return f"{source.stem}.o" if ours else f"{source.stem}_{_digest([source])}.o"


def _object(source: Path, out: Path, nvcc: str, arch: str, deps: List[Path]) -> Path:
    """Compile ``source`` to ``out`` unless ``out`` is newer than it and ``deps``."""
    if out.exists() and all(out.stat().st_mtime >= p.stat().st_mtime for p in [source, *deps]):
        return out
    common = [nvcc, "-std=c++20", "-O1", "-Xcompiler", "-fPIC,-Wall,-Werror", "-c", str(source),
              "-o", str(out)]
    if source.suffix == ".cu":
        _run(common + [f"-arch={arch}"])
    else:  # host code: torch's headers, our shim for the generated one, -Wextra on our code
        _run(common + ["-x", "c++", "-Xcompiler", "-Wextra", "-isystem", str(HERE),
                       *_torch_flags(), f"-I{CUDA_DIR}"])
    return out


def registered_ops(hosts: List[Path]) -> List[str]:
    """The op names ``hosts`` register under ``TORCH_LIBRARY_IMPL(fiited, CUDA, m)``."""
    ops = []
    for host in hosts:
        text = host.read_text()
        block = text[text.index("TORCH_LIBRARY_IMPL(fiited, CUDA"):]
        ops += re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', block)
    return ops


def with_host(replacement: Path) -> List[Path]:
    """The host files, ``replacement`` in place of the one with its name."""
    assert any(h.name == replacement.name for h in HOSTS), replacement
    return [replacement if h.name == replacement.name else h for h in HOSTS]


def build(out_dir: Path, hosts: List[Path] = HOSTS, nvcc: str = "nvcc",
          arch: str = "sm_80") -> Path:
    """Compile and link the host-check library; its path."""
    from torch.utils import cpp_extension

    out_dir.mkdir(parents=True, exist_ok=True)
    headers = sorted(CUDA_DIR.glob("*.h"))
    objects = [_object(k, out_dir / _object_name(k), nvcc, arch, headers) for k in KERNELS]
    objects.append(_object(STUBS, out_dir / _object_name(STUBS), nvcc, arch, []))
    objects += [_object(h, out_dir / _object_name(h), nvcc, arch, headers) for h in hosts]
    variant = "" if hosts == HOSTS else "_" + _digest(hosts)
    lib = out_dir / f"libfiited_cuda_host_check{variant}.so"
    torch_lib = cpp_extension.library_paths()[0]
    _run([nvcc, "-shared", "-o", str(lib), *map(str, objects), f"-L{torch_lib}", "-lc10",
          "-ltorch_cpu", "-ltorch", "-Xlinker", f"--no-undefined,-rpath,{torch_lib}"])
    return lib


_LOAD = """
import sys, torch
import torchrec_fiited.ops.native as native
assert native.AVAILABLE, "the native CPU ops (the schemas) are not built: make ext"
torch.ops.load_library(sys.argv[1])
unknown = [op for op in sys.argv[2:] if not hasattr(torch.ops.fiited, op)]
assert not unknown, f"no op schema for {unknown} (fiited_ops.cpp defines the schemas)"
missing = [op for op in sys.argv[2:]
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fiited::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("registered:", " ".join(sys.argv[2:]))
"""


def load(lib: Path, ops: List[str]) -> None:
    """Load ``lib`` in a fresh interpreter (a failed registration aborts it) and check ``ops``."""
    if not ops:
        raise SystemExit("host check: the host file registers no op under CUDA")
    done = subprocess.run([sys.executable, "-c", _LOAD, str(lib), *ops], capture_output=True,
                          text=True)
    if done.returncode != 0:
        # The dispatcher's message is above torch's stack frames.
        message = "\n".join(l for l in done.stderr.splitlines() if not l.startswith("frame #"))
        raise SystemExit(f"host check: loading {lib.name} failed:\n{message}")
    print(f"host check: {done.stdout.strip()} (CUDA host wrappers build, link and register)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--host", type=Path, default=None,
                        help="a host file to build in place of the one of the same name")
    parser.add_argument("--nvcc", default="nvcc")
    parser.add_argument("--arch", default="sm_80")
    args = parser.parse_args()
    hosts = HOSTS if args.host is None else with_host(args.host)
    load(build(args.out_dir, hosts, args.nvcc, args.arch), registered_ops(hosts))


if __name__ == "__main__":
    main()
