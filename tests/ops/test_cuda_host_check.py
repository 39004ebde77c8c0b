"""The CUDA host wrappers build, link and register against the installed (CPU) torch
(``cuda/host_check/check.py``, also run by ``make nvcc-check``), and the check fails where a
wrapper's C++ signature disagrees with its op's schema or a wrapper is not registered."""

import shutil
from pathlib import Path

import pytest

from tests.scripts import REPO, load_script
from torchrec_fiited.ops import native

HOST = REPO / "cuda" / "fiited_cuda_host.cpp"
HASH_HOST = REPO / "cuda" / "fiited_hash_cuda_host.cpp"

pytestmark = [
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit)"),
    pytest.mark.skipif(not native.AVAILABLE, reason="native ops not built: run `make ext`"),
]


@pytest.fixture(scope="module")
def check():
    """The check module and ``make nvcc-check``'s build directory: its objects (built there by
    `make test` before pytest) are reused; a modified copy gets objects and a library of its own."""
    return load_script("cuda/host_check/check.py"), REPO / "build" / "nvcc-check" / "host"


def test_the_host_wrappers_register_every_op(check, capsys):
    hc, out = check
    assert hc.HOSTS == [HOST, HASH_HOST]
    ops = hc.registered_ops(hc.HOSTS)
    # Every op of the lookup and hash-table families (ops/native.py): a family runs natively on
    # a device only if all its ops have a kernel there.
    assert ops == list(native.OPS) + list(native.HASH_OPS)
    hc.load(hc.build(out), ops)
    assert "registered: " + " ".join(ops) in capsys.readouterr().out


def _broken_copy(out: Path, case: str, host: Path, old: str, new: str) -> Path:
    """A copy of ``host`` with ``old`` replaced, at a fixed place in the build directory (so
    reruns replace its object instead of adding one)."""
    text = host.read_text()
    assert old in text, old
    bad = out / "modified" / case / host.name
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text(text.replace(old, new, 1))
    return bad


def test_a_signature_that_disagrees_with_the_schema_fails(check):
    hc, out = check
    # hash_lookup's schema says `int missing`.
    hosts = hc.with_host(_broken_copy(out, "signature", HASH_HOST, "const at::Tensor& keys, int64_t missing) {",
                                      "const at::Tensor& keys, double missing) {"))
    with pytest.raises(SystemExit, match="Mismatch in kernel C.. signatures"):
        hc.load(hc.build(out, hosts), hc.registered_ops(hosts))


def test_a_wrapper_registered_under_another_name_fails(check):
    hc, out = check
    hosts = hc.with_host(_broken_copy(out, "name", HASH_HOST, 'm.impl("hash_erase",',
                                      'm.impl("hash_erasing",'))
    lib = hc.build(out, hosts)
    with pytest.raises(SystemExit, match=r"no op schema for \['hash_erasing'\]"):
        hc.load(lib, hc.registered_ops(hosts))  # what the host files claim
    with pytest.raises(SystemExit, match=r"no CUDA kernel registered for \['hash_erase'\]"):
        hc.load(lib, hc.registered_ops(hc.HOSTS))  # what the ops need
