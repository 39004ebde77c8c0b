"""The store's large tensors are advised onto transparent huge pages (``store/memory.py``)."""

import sys

import pytest
import torch

from torchrec_fiited.store import memory


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "absent"


def test_contents_are_those_of_torch_full_and_zeros():
    t = memory.full((1 << 20, 2), -1, dtype=torch.int16)
    assert t.shape == (1 << 20, 2) and t.dtype == torch.int16 and bool((t == -1).all())
    z = memory.zeros((3, 5))
    assert torch.equal(z, torch.zeros(3, 5))


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
                    reason="transparent huge pages not offered here")
def test_large_cpu_tensors_are_advised_and_the_switch_turns_it_off(monkeypatch):
    big = torch.empty(3 << 20, dtype=torch.float32)  # 12 MB: whole 2 MB pages inside
    assert memory.advise_huge_pages(big)
    assert not memory.advise_huge_pages(torch.empty(1000))  # smaller than two huge pages
    monkeypatch.setenv(memory.HUGE_PAGES_ENV, "0")
    assert not memory.advise_huge_pages(big)
