"""Count-min sketch of decayed chunk utilities for ids without an entry (store v2 admission).

A non-resident id still earns utility (its gradient at the zero row it reads); the sketch keeps
an over-estimate of it in fixed memory, so that the id can win an entry later without the store
holding anything per id. CAFE (SIGMOD'24) keeps cold ids' importance the same way (HotSketch).
"""

import torch
from torch import nn

from torchrec_fiited.ops.dispatch import use_native_sketch
from torchrec_fiited.store import memory
from torchrec_fiited.store.layout import _mix64

# Cells are bf16: half of fp32's bytes, fp32's range (a utility is a gradient norm times an access
# count: 1e-6 at batch 8192 for a tail id, fp16 would flush it to zero). Every value is rounded
# *up* to bf16 (``ceil_bf16``), so an estimate still never falls below the true decayed sum; it
# over-estimates by less than 2^-7 of itself per rounding (7 fraction bits).
SKETCH_DTYPE = torch.bfloat16
SKETCH_CELL_BYTES = 2
# Cells decayed per block (``decay_to``): bounds the fp32 temporaries to 1 MB.
_DECAY_BLOCK = 1 << 18

# Per-row salts of the depth hash functions (arbitrary odd 63-bit constants).
_SALTS = (0x2545F4914F6CDD1D, 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x3C6EF372FE94F82B)


class UtilitySketch(nn.Module):
    """``depth`` rows of ``width`` cells, each a K-vector of utilities (bf16 [depth, width, K]).

    ``add`` raises one cell per row (conservative update), ``estimate`` takes the minimum over
    the rows (per chunk), so an estimate never falls below the true decayed sum of what was added
    for a key (collisions only add). ``decay_to`` multiplies everything by gamma^age at a pruning cycle, so within a cycle
    interval additions are not decayed against each other (an over-estimate by at most
    gamma^-T). ``width == 0`` is a sketch that holds nothing: every estimate is 0.

    Args:
        width: cells per row.
        depth: rows (hash functions), 1-4.
        num_chunks: K.
        device: where the tensor lives.
    """

    def __init__(self, width: int, depth: int, num_chunks: int, device: torch.device) -> None:
        super().__init__()
        if not 1 <= depth <= len(_SALTS):
            raise ValueError(f"sketch depth must be in [1, {len(_SALTS)}], got {depth}")
        self.width = int(width)
        self.depth = depth if width > 0 else 0
        self.num_chunks = num_chunks
        self.register_buffer(
            "counts", memory.zeros((self.depth, self.width, num_chunks), dtype=SKETCH_DTYPE, device=device)
        )
        self.register_buffer("decayed_to", torch.tensor(0, dtype=torch.int64, device=device))

    # The reference of the native sketch ops (cuda/fiited_sketch_cpu.cpp), used without them.

    def _cells(self, keys: torch.Tensor) -> torch.Tensor:
        """Cell int64 [depth, n] of each key in each row."""
        return torch.stack(
            [torch.remainder(_mix64(keys ^ salt), self.width) for salt in _SALTS[: self.depth]]
        )

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``values`` fp32 [n, K] (>= 0) to distinct ``keys`` int64 [n], by conservative update:
        each of a key's cells is raised to at most (its current estimate + value), never added to
        blindly. The estimate still never falls below the true sum, and a tail key no longer
        inherits the whole mass of the keys it collides with (the count-min over-estimate that
        made cold ids look hot and displace residents)."""
        self._raise_keys(keys, values, add=True)

    def raise_to(self, keys: torch.Tensor, totals: torch.Tensor) -> None:
        """Record that distinct ``keys`` int64 [n] have utility ``totals`` fp32 [n, K] in all:
        each of their cells is raised to at least that, never added to.

        For entries leaving the table: their utility already holds what the sketch estimated
        when they were admitted, so adding it back would count that mass twice, and an id going
        in and out of the table would double its estimate each round trip."""
        self._raise_keys(keys, totals, add=False)

    def _raise_keys(self, keys: torch.Tensor, values: torch.Tensor, add: bool) -> None:
        """Raise each key's cells to its target: estimate + ``values`` (``add``) or ``values``."""
        if self.width == 0 or keys.numel() == 0:
            return
        values = values.to(torch.float32)
        if use_native_sketch(self.counts.device):
            torch.ops.fiited.sketch_raise(self.counts, keys, values, add, self._salts())
            return
        cells = self._cells(keys)
        self._raise(cells, self._min_over_rows(cells) + values if add else values)

    def _raise(self, cells: torch.Tensor, target: torch.Tensor) -> None:
        target = ceil_bf16(target)
        for r in range(self.depth):
            index = cells[r].unsqueeze(1).expand(-1, self.num_chunks)
            self.counts[r].scatter_reduce_(0, index, target, reduce="amax")

    def _min_over_rows(self, cells: torch.Tensor) -> torch.Tensor:
        """fp32 [n, K]."""
        est = self.counts[0][cells[0]]
        for r in range(1, self.depth):
            est = torch.minimum(est, self.counts[r][cells[r]])
        return est.float()

    def estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """Over-estimated utilities fp32 [n, K] of ``keys`` int64 [n]."""
        if self.width == 0:
            return torch.zeros(keys.numel(), self.num_chunks, device=self.counts.device)
        if use_native_sketch(self.counts.device):
            return torch.ops.fiited.sketch_estimate(self.counts, keys, self._salts())
        return self._min_over_rows(self._cells(keys))

    def _salts(self):
        return list(_SALTS[: self.depth])

    def decay_to(self, step: int, gamma: float) -> None:
        """Bring every cell to ``step``: multiply by gamma ** (step - the last decay's step)."""
        age = step - int(self.decayed_to)
        if self.width and age > 0 and gamma != 1.0:
            # Block by block: the fp32 copy of a whole sketch (2x its bytes) was the peak RSS of
            # bench_scale's cycles (51 MB for a 8.5 MB sketch, 2.19x the budget in all).
            flat = self.counts.view(-1)
            for lo in range(0, flat.numel(), _DECAY_BLOCK):
                part = flat[lo : lo + _DECAY_BLOCK]
                f = part.float().mul_(gamma**age)
                _round_up_to_bf16_(f)
                part.copy_(f)  # exact: f holds bf16 values
        self.decayed_to.fill_(max(step, int(self.decayed_to)))


def ceil_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 >= each of ``x`` (fp32, >= 0, not NaN)."""
    f = x.to(torch.float32, copy=True).contiguous()
    return _round_up_to_bf16_(f).to(SKETCH_DTYPE)


def _round_up_to_bf16_(f: torch.Tensor) -> torch.Tensor:
    """In place on contiguous fp32 ``f`` (>= 0, not NaN): bf16 is fp32's top 16 bits, so adding
    0xFFFF before clearing the low 16 rounds any value between two bf16s up to the larger (and
    stays below 2^31 as int32 for values <= inf). Returns ``f``."""
    bits = f.view(torch.int32)
    bits.add_(0xFFFF).bitwise_and_(-0x10000)
    return f
