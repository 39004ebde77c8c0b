"""The repository's scripts (benchmarks/, cuda/host_check/) loaded as modules by the tests that
call their functions; needs nothing but the standard library, so it also serves tests that run
where torchrec is absent."""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """The script at ``REPO / relative_path`` as a module (its ``__main__`` block does not run)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
