"""The CUDA host wrappers build, link and register against the installed (CPU) torch
(``cuda/host_check/check.py``, also run by ``make nvcc-check``), and the check fails where a
wrapper's C++ signature disagrees with its op's schema or a wrapper is not registered."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from torchrec_fiited.ops import native

REPO = Path(__file__).resolve().parents[2]
HOST = REPO / "cuda" / "fiited_cuda_host.cpp"

pytestmark = [
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit)"),
    pytest.mark.skipif(not native.AVAILABLE, reason="native ops not built: run `make ext`"),
]


def _check_module():
    spec = importlib.util.spec_from_file_location("host_check", REPO / "cuda/host_check/check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The check module and a build directory shared by the tests (kernels and stubs built once)."""
    return _check_module(), tmp_path_factory.mktemp("host_check")


def test_the_host_wrappers_register_every_op(check, capsys):
    hc, out = check
    ops = hc.registered_ops(HOST)
    assert ops == ["lookup_forward", "lookup_forward_out", "lookup_forward_batched_out",
                   "fused_backward"]
    hc.load(hc.build(out, HOST), ops)
    assert "registered: " + " ".join(ops) in capsys.readouterr().out


def _broken_copy(tmp_path: Path, old: str, new: str) -> Path:
    text = HOST.read_text()
    assert text.count(old) >= 1, old
    bad = tmp_path / "fiited_cuda_host.cpp"
    bad.write_text(text.replace(old, new, 1))
    return bad


def test_a_signature_that_disagrees_with_the_schema_fails(check, tmp_path):
    hc, out = check
    # lookup_forward's schema says `bool mean`; the first `bool mean)` in the file is its wrapper.
    bad = _broken_copy(tmp_path, "    bool mean) {", "    int64_t mean) {")
    with pytest.raises(SystemExit, match="Mismatch in kernel C.. signatures"):
        hc.load(hc.build(out / "bad_signature", bad), hc.registered_ops(bad))


def test_a_wrapper_registered_under_another_name_fails(check, tmp_path):
    hc, out = check
    bad = _broken_copy(tmp_path, 'm.impl("fused_backward",', 'm.impl("fused_backwards",')
    lib = hc.build(out / "misnamed", bad)
    with pytest.raises(SystemExit, match=r"no op schema for \['fused_backwards'\]"):
        hc.load(lib, hc.registered_ops(bad))  # what the host file claims
    with pytest.raises(SystemExit, match=r"no CUDA kernel registered for \['fused_backward'\]"):
        hc.load(lib, hc.registered_ops(HOST))  # what the ops need
