"""FIITED configuration: one frozen dataclass, usable directly as a Hydra structured config.

No ``from __future__ import annotations`` here: OmegaConf reads the real field types, and a
stringified annotation breaks structured configs (FBGEMM's ``optimizer_config.py`` gives the same
rule). OmegaConf runs ``__post_init__`` only in ``OmegaConf.to_object``, so entry points convert.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

RATIO_MODES = ("manual", "dynamic")
RATIO_TARGETS = ("budget", "ratios")
UTILITIES = ("grad_access", "access")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
SCHEDULES = ("interval", "itep")
MISSES = ("auto", "zeros", "hashed")
MAX_NUM_CHUNKS = 64  # liveness is chunk_slots >= 0 (no K-bit mask); K only sets 8K + 16 B per entry
DIM_SCOPES = ("table", "global")


@dataclass(frozen=True)
class DimPruningConfig:
    """FIITED-2D: prune whole embedding dimensions on top of chunk pruning (paper III-B).

    Each table keeps a per-dimension utility, the decayed sum over steps of the squared
    pooled-output gradient ``sum_b grad[b, d] ** 2``. After ``cold_start_steps`` at full width,
    every chunk of a table keeps its best ``cs'`` of ``chunk_size`` columns (the set may differ
    per chunk), and its pool stores only those: its weights shrink from [C, chunk_size] to
    [C, cs'] right then, so ``D_active = K * cs'``. Pruned dimensions read as zeros.

    Tables sharing a pool share its width ``cs'`` (slots must stay interchangeable), but each
    keeps its own columns unless ``shared_columns``.

    Args:
        target_ratio: fraction of the stored columns to prune, in [0, 1); 0 turns dimension
            pruning off. ``cs' = max(1, ceil((1 - target_ratio) * chunk_size))``: never more
            than the target is pruned.
        scope: "table": every pool prunes ``target_ratio`` of its columns. "global": the pools'
            widths are chosen together so that their column bytes shrink by at most
            ``target_ratio`` overall; the column ranks with the least utility per stored byte go
            first, and every pool keeps at least one column per chunk. With a single pool the
            two agree.
        shared_columns: every table of a pool keeps the same columns, chosen by the tables'
            summed utilities, instead of each its own. A dot-product interaction (DLRM) between
            two tables sees only the columns both keep, so sharing keeps all of them aligned.
        cold_start_steps: training steps at full width before the first decision, >= 1.
        revisit_interval: steps between later decisions, which may bring a dimension back
            (re-initialised); 0 decides once.
        decay: gamma in u = gamma * u + sum_b g ** 2, applied every step, in (0, 1]; 1 is
            the paper's plain sum.

    Example::

        cfg = FiitedConfig(num_chunks=2, budget=0.25,
                           dim_pruning=DimPruningConfig(target_ratio=0.5, cold_start_steps=100))
        ebc = FiitedEmbeddingBagCollection(tables, cfg)  # a table "t1" with D=16: 2 chunks of 8
        ...  # 100 training steps
        ebc.stats()["tables"]["t1"]["active_dim"]  # 8: each chunk stores 4 of its 8 columns
        ebc.store.pools["shared_cs8"].weights.shape  # (capacity, 4), was (capacity, 8)
    """

    target_ratio: float = 0.0
    scope: str = "table"
    shared_columns: bool = False
    cold_start_steps: int = 100
    revisit_interval: int = 0
    decay: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.target_ratio, bool) or not (
            isinstance(self.target_ratio, (int, float)) and 0.0 <= self.target_ratio < 1.0
        ):
            raise ValueError(
                f"dim_pruning.target_ratio must be in [0, 1) (0 = off), got {self.target_ratio!r}"
            )
        _check_choice("dim_pruning.scope", self.scope, DIM_SCOPES)
        if not isinstance(self.shared_columns, bool):
            raise ValueError(f"dim_pruning.shared_columns must be a bool, got {self.shared_columns!r}")
        _check_int("dim_pruning.cold_start_steps", self.cold_start_steps, 1, None)
        _check_int("dim_pruning.revisit_interval", self.revisit_interval, 0, None)
        if isinstance(self.decay, bool) or not (
            isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0
        ):
            raise ValueError(f"dim_pruning.decay must be in (0, 1], got {self.decay!r}")

    @property
    def enabled(self) -> bool:
        return self.target_ratio > 0.0


@dataclass(frozen=True)
class FiitedConfig:
    """How a FIITED embedding collection stores, scores and prunes its chunks.

    Every row of a table with dim ``D`` is split into ``num_chunks`` (K) chunks of
    ``chunk_size = D / K`` floats. Chunk pools hold ``budget`` times the bytes of the unpruned
    tables; chunks compete for pool slots by utility.

    Args:
        num_chunks: K, chunks per row. 1 is AdaEmbed (row pruning). Must divide every table's dim.
        budget: fraction of the unpruned tables' bytes (fp32 weights plus the same optimizer's
            state) that the collection holds in total, in (0, 1]: chunks, optimizer state, hash
            tables, sketch, fallback and counters (``store.sizing``).
        table_budgets: per-table budget overrides; such a table gets a pool of its own instead of
            competing with the other tables in the shared pool.
        ratio_mode: "manual" (one threshold per chunk index, from per-chunk pruning ratios) or
            "dynamic" (one global threshold over all chunk utilities).
        chunk_prune_ratios: explicit K per-chunk pruning ratios for manual mode; when None they
            are fitted to average ``1 - budget`` with f(x) = c * x**power_law_exponent.
        ratio_target: in manual mode, what the ratios steer. "budget" (default): they split the
            pool between chunk indices and each cycle fills the pool, so a pool of which only
            part is seen yet is still used. "ratios": the paper's literal rule, each cycle
            keeps (1 - p_k) of the seen entries' chunk k, and the budget only caps the pools.
        power_law_exponent: a in f(x) = c * x**a; 1.0 is the paper's linear fit, 0.5 its concave one.
        max_chunk_prune_ratio: cap on any fitted ratio (the paper's 95%); capped chunks are
            fixed and the rest refitted so the average still holds.
        decay: gamma in u = gamma * u + a * g, in (0, 1].
        prune_interval: T, training steps between pruning cycles; 0 disables automatic cycles
            (``prune()`` still runs one on demand).
        warmup_steps: no automatic cycle runs before this step.
        schedule: "interval" (every ``prune_interval`` steps) or "itep" (TorchRec ITEP's
            front-loaded schedule: every 3, 30, 300 steps below 10, 100, 1000 steps, then every
            ``prune_interval``).
        sample_size: m, utilities sampled per pool to estimate thresholds.
        enforce_ratio: enforced pruning (eviction) runs when more than this fraction of the
            sampled chunks cross their threshold.
        utility: "grad_access" (u += accesses * ||chunk grad||, the paper) or "access"
            (u += accesses, the decayed access count TorchRec's ITEP uses).
        optimizer: sparse optimizer fused into backward: "sgd", "adagrad" or "rowwise_adagrad"
            (rowwise over each chunk slot, so K=1 is TBE's EXACT_ROWWISE_ADAGRAD).
        learning_rate: initial learning rate of the fused optimizer.
        eps: Adagrad epsilon.
        weight_decay: L2 penalty added to the gradient of live chunks.
        hash_ids: hash arbitrary int64 ids into the table's ``num_embeddings`` entries instead of
            requiring ``0 <= id < num_embeddings``.
        seed: key of the counter-based generator behind sampling and chunk (re-)initialisation:
            values depend on (seed, table, row, chunk, step) only, not on the plan or process.
        dim_pruning: FIITED-2D dimension pruning (off by default); a plain mapping, as Hydra
            passes it, is converted.
        miss: what an id without an entry reads: "zeros" (the paper), "hashed" (a small
            shared table per table indexed by a hash of the id, trained like the chunks; CAFE)
            or "auto": hashed for a pool whose entries cover under 0.3% of its ids
            (``store.sizing.AUTO_FALLBACK_COVERAGE``), else zeros.
        fallback_fraction: share of each pool's budget for the hashed fallback, in [0, 1).
        sketch_fraction: share of each pool's budget for the utility sketch of non-resident
            ids, in [0, 1) (spent only when the pool cannot hold an entry for every row).
        entries_per_slot: hash-table entries per chunk slot; None derives it from K
            (``store.sizing``).
        bucket_size: slots per hash-table bucket, a power of two in [8, 128].
    """

    num_chunks: int = 2
    budget: float = 0.25
    table_budgets: Dict[str, float] = field(default_factory=dict)
    ratio_mode: str = "manual"
    chunk_prune_ratios: Optional[List[float]] = None
    ratio_target: str = "budget"
    power_law_exponent: float = 1.0
    max_chunk_prune_ratio: float = 0.95
    decay: float = 0.99
    prune_interval: int = 1000
    warmup_steps: int = 0
    schedule: str = "interval"
    sample_size: int = 65536
    enforce_ratio: float = 0.01
    utility: str = "grad_access"
    optimizer: str = "rowwise_adagrad"
    learning_rate: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    hash_ids: bool = False
    seed: int = 0
    dim_pruning: DimPruningConfig = field(default_factory=DimPruningConfig)
    miss: str = "auto"
    fallback_fraction: float = 0.1
    sketch_fraction: float = 0.05
    entries_per_slot: Optional[float] = None
    bucket_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.dim_pruning, Mapping):
            object.__setattr__(self, "dim_pruning", _dim_pruning_from(self.dim_pruning))
        elif not isinstance(self.dim_pruning, DimPruningConfig):
            raise ValueError(
                f"dim_pruning must be a DimPruningConfig or a mapping of its fields, got "
                f"{type(self.dim_pruning).__name__}"
            )
        _check_int("num_chunks", self.num_chunks, 1, MAX_NUM_CHUNKS)
        _check_budget("budget", self.budget)
        for name, b in self.table_budgets.items():
            _check_budget(f"table_budgets[{name!r}]", b)
        _check_choice("ratio_mode", self.ratio_mode, RATIO_MODES)
        _check_choice("ratio_target", self.ratio_target, RATIO_TARGETS)
        _check_choice("utility", self.utility, UTILITIES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.chunk_prune_ratios is not None:
            ratios = list(self.chunk_prune_ratios)
            if len(ratios) != self.num_chunks:
                raise ValueError(
                    f"chunk_prune_ratios must have num_chunks={self.num_chunks} entries, "
                    f"got {len(ratios)}: {ratios}"
                )
            for k, r in enumerate(ratios):
                if not 0.0 <= r < 1.0:
                    raise ValueError(f"chunk_prune_ratios[{k}] must be in [0, 1), got {r}")
            object.__setattr__(self, "chunk_prune_ratios", [float(r) for r in ratios])
        if not (self.power_law_exponent > 0 and math.isfinite(self.power_law_exponent)):
            raise ValueError(f"power_law_exponent must be > 0, got {self.power_law_exponent}")
        if not 0.0 < self.max_chunk_prune_ratio < 1.0:
            raise ValueError(
                f"max_chunk_prune_ratio must be in (0, 1), got {self.max_chunk_prune_ratio}"
            )
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        _check_int("prune_interval", self.prune_interval, 0, None)
        _check_int("warmup_steps", self.warmup_steps, 0, None)
        _check_int("sample_size", self.sample_size, 1, None)
        if not 0.0 <= self.enforce_ratio <= 1.0:
            raise ValueError(f"enforce_ratio must be in [0, 1], got {self.enforce_ratio}")
        if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be finite and >= 0, got {self.learning_rate}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        _check_choice("miss", self.miss, MISSES)
        for name in ("fallback_fraction", "sketch_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.entries_per_slot is not None and not (
            isinstance(self.entries_per_slot, (int, float)) and 0.0 < self.entries_per_slot
            and math.isfinite(self.entries_per_slot)
        ):
            raise ValueError(f"entries_per_slot must be > 0 (or None), got {self.entries_per_slot!r}")
        if self.bucket_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"bucket_size must be a power of two in [8, 128], got {self.bucket_size!r}")

    def budget_for(self, table_name: str) -> float:
        """The budget that applies to ``table_name`` (its override, else the global one)."""
        return self.table_budgets.get(table_name, self.budget)

    def to_dict(self) -> Dict[str, object]:
        """Plain-Python form, stored in checkpoints to detect a mismatched configuration."""
        return dataclasses.asdict(self)


# The utility decay the app derives from the budget when its config leaves ``decay`` null. Long
# memory where the budget holds most of the ids that matter (a utility close to the run's whole
# gradient mass, the signal the frequency oracle has up front), short memory where slots are
# scarce (there a resident's accumulated utility would shut out newcomers, known only through
# the sketch). Measured, 0.999 against 0.98 (README "Utility decay"): at 10x +0.0065 on a
# MovieLens-shaped log, +0.0000 on the hard data; at 100x -0.0003 to +0.0008; at 1000x -0.0058.
SHORT_MEMORY = (0.001, 0.98)  # (budget at and below which, decay): half-life 34 steps
LONG_MEMORY = (0.01, 0.999)  # (budget at and above which, decay): half-life 693 steps


def decay_for_budget(budget: float) -> float:
    """gamma for ``budget``: ``SHORT_MEMORY``'s at and below its budget, ``LONG_MEMORY``'s at and
    above its, and between them the half-life interpolated geometrically in the budget."""
    _check_budget("budget", budget)
    (b0, g0), (b1, g1) = SHORT_MEMORY, LONG_MEMORY
    if budget <= b0:
        return g0
    if budget >= b1:
        return g1
    h0, h1 = math.log(0.5) / math.log(g0), math.log(0.5) / math.log(g1)
    t = math.log(budget / b0) / math.log(b1 / b0)
    return 0.5 ** (1.0 / (h0 * (h1 / h0) ** t))


def _dim_pruning_from(fields: Mapping) -> DimPruningConfig:
    known = {f.name for f in dataclasses.fields(DimPruningConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"dim_pruning has unknown fields {unknown}; known are {sorted(known)}")
    return DimPruningConfig(**dict(fields))


def _check_budget(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: int, lo: int, hi: Optional[int]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (
        hi is not None and value > hi
    ):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
