"""The store's large CPU tensors on transparent huge pages where the kernel offers them.

Every training step reads chunks, slot rows and hash buckets at random over hundreds of MB (the
26 mixed tables at budget 0.25: a 211 MB chunk pool, a 16 MB hash table, 16 MB of slot rows).
With 4 KB pages nearly every such read also misses the TLB (about 8 MB of reach) and walks the
page table; with 2 MB pages the same reach is 4 GB. Linux hands out huge pages for a range the
process advises (``MADV_HUGEPAGE``) before first touching it, when transparent huge pages are
``always`` or ``madvise`` (the default of most distributions), so these tensors are allocated,
advised, then filled. Elsewhere (other OSes, THP ``never``, CUDA tensors, small tensors) they are
plain tensors. What is stored and the bytes counted do not change. ``TORCHREC_FIITED_HUGE_PAGES=0``
turns the advice off (read when a store is built).
"""

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Optional, Sequence

import torch

HUGE_PAGES_ENV = "TORCHREC_FIITED_HUGE_PAGES"
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None where it cannot be loaded."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc.madvise


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise huge pages for the whole 2 MB pages inside ``t``'s bytes (before they are first
    written, for the advice to take effect). True when advised; a refusal is not an error."""
    nbytes = t.numel() * t.element_size()
    if (t.device.type != "cpu" or not sys.platform.startswith("linux") or nbytes < 2 * _HUGE_PAGE
            or os.environ.get(HUGE_PAGES_ENV, "1") == "0"):
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0


def full(shape: Sequence[int], value, dtype: torch.dtype = torch.float32,
         device: Optional[torch.device] = None) -> torch.Tensor:
    """``torch.full`` of a store tensor, on huge pages where offered (module docstring)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    advise_huge_pages(t)
    return t.fill_(value)


def zeros(shape: Sequence[int], dtype: torch.dtype = torch.float32,
          device: Optional[torch.device] = None) -> torch.Tensor:
    """``torch.zeros`` of a store tensor, on huge pages where offered (module docstring)."""
    return full(shape, 0, dtype, device)
