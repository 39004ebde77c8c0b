"""The native FIITED ops (``torch.ops.fiited.*``): loads the built library and registers fakes.

The schemas are in ``cuda/fiited_ops.cpp``; CPU and CUDA kernels are in ``cuda/``. Installing the
package (``pip install --no-build-isolation .``, or ``make ext`` in a checkout) builds
``torchrec_fiited/_C*.so``; importing this module loads it and so registers ``torch.ops.fiited.*``
(a program exported with ``torch.export`` needs that import, and nothing else, before
``torch.export.load``). Without the library, ``AVAILABLE`` is False, ``ops/dispatch.py`` uses the
PyTorch reference and a ``RuntimeWarning`` says so once. The fake (meta) impls below give shapes
and dtypes for torch.compile and fake tensors, with the same argument checks that do not need data.

Example::

    from torchrec_fiited.ops import native
    if native.AVAILABLE:
        # weights fp32 [C, cs], chunk_slots int16/int32 [E, K], entries int64 [n], offsets int64 [B+1]
        out = torch.ops.fiited.lookup_forward(weights, chunk_slots, entries, offsets, None, False)
        out.shape  # (B, K * cs)
"""

import glob
import os
import warnings
from typing import FrozenSet, Optional

import torch

_LIBRARY_GLOB = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_C*.so")
OPS = ("lookup_forward", "lookup_forward_out", "lookup_forward_batched_out", "fused_backward")
HASH_OPS = ("hash_lookup", "hash_lookup_out", "hash_insert", "hash_erase")  # store/hash_table.py
SKETCH_OPS = ("sketch_estimate", "sketch_raise")  # store/sketch.py
INIT_OPS = ("counter_uniform_grid",)  # store/vhpi.py init_values
KEYS_OPS = ("feature_keys", "feature_keys_out", "row_permutation", "expand_bags", "expand_bags_out",
            "positions_equal", "positions_in")  # modules/batch.py, distributed/local_lookups.py
# bench_lookup on 2 CPU cores: the native ops run at 1.04-1.75x FBGEMM TBE, the reference at 0.24-0.37x.
_SLOW_PATH = (
    "FiitedEmbeddingBagCollection falls back to the PyTorch reference ops (ops/reference.py), "
    "about 3-7x slower than the native ops (benchmarks/bench_lookup.py). Build them with `pip install --no-build-isolation .` "
    "(or `make ext` in a checkout; a C++ compiler is needed)"
)


def _load() -> bool:
    """Load the built library once; False (with one RuntimeWarning) when it is missing or broken.

    No warning when ``TORCHREC_FIITED_NATIVE=0`` asks for the reference on purpose.
    """
    if hasattr(torch.ops.fiited, "lookup_forward"):
        return True
    quiet = os.environ.get("TORCHREC_FIITED_NATIVE", "1") == "0"
    paths = sorted(glob.glob(_LIBRARY_GLOB))
    if not paths:
        if not quiet:
            warnings.warn(
                f"torchrec_fiited: native ops not built (no {_LIBRARY_GLOB}). {_SLOW_PATH}.",
                RuntimeWarning, stacklevel=2,
            )
        return False
    try:
        torch.ops.load_library(paths[-1])
    except (OSError, RuntimeError) as e:
        if not quiet:
            warnings.warn(
                f"torchrec_fiited: cannot load {paths[-1]} ({e}), e.g. built against another "
                f"torch. {_SLOW_PATH}.", RuntimeWarning, stacklevel=2,
            )
        return False
    return True


def _devices_with_kernels(ops=OPS) -> FrozenSet[str]:
    """Device types ("cpu", "cuda") for which every op of ``ops`` has a kernel."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if all(
            torch._C._dispatch_has_kernel(f"fiited::{op}") and has(f"fiited::{op}", key)
            for op in ops
        )
    )


AVAILABLE: bool = _load()
DEVICES: FrozenSet[str] = _devices_with_kernels() if AVAILABLE else frozenset()
# The hash-table ops have their own set: a library built before them still serves the lookup ops.
HASH_DEVICES: FrozenSet[str] = _devices_with_kernels(HASH_OPS) if AVAILABLE else frozenset()
SKETCH_DEVICES: FrozenSet[str] = _devices_with_kernels(SKETCH_OPS) if AVAILABLE else frozenset()
INIT_DEVICES: FrozenSet[str] = _devices_with_kernels(INIT_OPS) if AVAILABLE else frozenset()
KEYS_DEVICES: FrozenSet[str] = _devices_with_kernels(KEYS_OPS) if AVAILABLE else frozenset()


def _check_dtype_dim(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, dim: int) -> None:
    torch._check(
        t.dtype == dtype and t.dim() == dim,
        lambda: f"[torchrec_fiited] fiited::{op}: {name} must be a {dim}-D {dtype} tensor, "
        f"got a {t.dim()}-D {t.dtype} tensor",
    )


def _check_slots(op: str, chunk_slots: torch.Tensor) -> None:
    torch._check(
        chunk_slots.dtype in (torch.int16, torch.int32) and chunk_slots.dim() == 2,
        lambda: f"[torchrec_fiited] fiited::{op}: chunk_slots must be a 2-D int16 or int32 "
        f"tensor, got a {chunk_slots.dim()}-D {chunk_slots.dtype} tensor",
    )


def _check_lookup_args(
    op: str,
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
) -> None:
    _check_dtype_dim(op, "weights", weights, torch.float32, 2)
    _check_slots(op, chunk_slots)
    _check_dtype_dim(op, "entries", entries, torch.int64, 1)
    _check_dtype_dim(op, "offsets", offsets, torch.int64, 1)
    torch._check(
        offsets.shape[0] >= 1,
        lambda: f"[torchrec_fiited] fiited::{op}: offsets must hold B + 1 >= 1 bag boundaries, "
        f"got shape {tuple(offsets.shape)}",
    )
    if per_sample_weights is not None:
        _check_dtype_dim(op, "per_sample_weights", per_sample_weights, torch.float32, 1)
        torch._check(
            per_sample_weights.shape[0] == entries.shape[0],
            lambda: f"[torchrec_fiited] fiited::{op}: per_sample_weights must have one weight per "
            f"entry, got {per_sample_weights.shape[0]} vs {entries.shape[0]}",
        )


def _lookup_forward_fake(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mean: bool,
) -> torch.Tensor:
    """Output fp32 [B, K * chunk_size] for offsets int64 [B + 1]; see ``reference.lookup_forward``."""
    _check_lookup_args("lookup_forward", weights, chunk_slots, entries, offsets, per_sample_weights)
    return weights.new_empty((offsets.shape[0] - 1, chunk_slots.shape[1] * weights.shape[1]))


def _lookup_forward_out_fake(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    mean: bool,
    out: torch.Tensor,
) -> None:
    """Checks that ``out`` is fp32 [B, K * chunk_size]; the op writes it in place."""
    op = "lookup_forward_out"
    _check_lookup_args(op, weights, chunk_slots, entries, offsets, per_sample_weights)
    _check_dtype_dim(op, "out", out, torch.float32, 2)
    want = (offsets.shape[0] - 1, chunk_slots.shape[1] * weights.shape[1])
    torch._check(
        tuple(out.shape) == want,
        lambda: f"[torchrec_fiited] fiited::{op}: out must have shape (B, K * chunk_size) = "
        f"{want}, got {tuple(out.shape)}",
    )


def _lookup_forward_batched_out_fake(
    weights: torch.Tensor,
    chunk_slots: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    feature_cols: torch.Tensor,
    feature_mean: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Checks dtypes and that ``out`` is fp32 [B, W] for offsets [F * B + 1]; written in place."""
    op = "lookup_forward_batched_out"
    _check_lookup_args(op, weights, chunk_slots, entries, offsets, per_sample_weights)
    _check_dtype_dim(op, "feature_cols", feature_cols, torch.int64, 1)
    _check_dtype_dim(op, "feature_mean", feature_mean, torch.bool, 1)
    _check_dtype_dim(op, "out", out, torch.float32, 2)
    F = feature_cols.shape[0]
    torch._check(
        F >= 1 and (offsets.shape[0] - 1) == F * out.shape[0],
        lambda: f"[torchrec_fiited] fiited::{op}: offsets must hold F * B + 1 = {F} * "
        f"{out.shape[0]} + 1 boundaries, got {offsets.shape[0]}",
    )


def _fused_backward_fake(
    grad_rows: torch.Tensor,
    row_of_id: torch.Tensor,
    id_scale: Optional[torch.Tensor],
    entries: torch.Tensor,
    chunk_slots: torch.Tensor,
    utilities: torch.Tensor,
    weights: torch.Tensor,
    momentum: torch.Tensor,
    optimizer: str,
    lr: float,
    eps: float,
    weight_decay: float,
    utility: str,
    utility_scale: float,
    miss_utilities: Optional[torch.Tensor] = None,
) -> None:
    """Checks shapes and dtypes only; the op mutates its inputs and returns nothing."""
    op = "fused_backward"
    _check_dtype_dim(op, "grad_rows", grad_rows, torch.float32, 2)
    _check_dtype_dim(op, "row_of_id", row_of_id, torch.int64, 1)
    _check_dtype_dim(op, "entries", entries, torch.int64, 1)
    _check_slots(op, chunk_slots)
    _check_dtype_dim(op, "utilities", utilities, torch.float32, 2)
    _check_dtype_dim(op, "weights", weights, torch.float32, 2)
    K, cs = chunk_slots.shape[1], weights.shape[1]
    torch._check(
        grad_rows.shape[1] == K * cs,
        lambda: f"[torchrec_fiited] fiited::{op}: grad_rows.size(1) must be D = K * chunk_size = "
        f"{K} * {cs}, got {grad_rows.shape[1]}",
    )
    torch._check(
        row_of_id.shape[0] == entries.shape[0],
        lambda: f"[torchrec_fiited] fiited::{op}: row_of_id must have one row per entry, got "
        f"{row_of_id.shape[0]} vs {entries.shape[0]}",
    )
    torch._check(
        optimizer in ("sgd", "adagrad", "rowwise_adagrad"),
        lambda: f"[torchrec_fiited] fiited::{op}: optimizer must be one of sgd, adagrad, "
        f"rowwise_adagrad, got {optimizer!r}",
    )


if AVAILABLE:
    torch.library.register_fake("fiited::lookup_forward")(_lookup_forward_fake)
    torch.library.register_fake("fiited::lookup_forward_out")(_lookup_forward_out_fake)
    torch.library.register_fake("fiited::lookup_forward_batched_out")(_lookup_forward_batched_out_fake)
    torch.library.register_fake("fiited::fused_backward")(_fused_backward_fake)


# ---- resident-id hash table ops (cuda/fiited_hash_ops.cpp; store/hash_table.py) ---------------


def _hash_lookup_fake(
    table_keys: torch.Tensor, bucket_size: int, keys: torch.Tensor, missing: int = -1
) -> torch.Tensor:
    """Slots int64 [n] for keys int64 [n]; see ``hash_reference.lookup``."""
    _check_dtype_dim("hash_lookup", "table_keys", table_keys, torch.int64, 1)
    _check_dtype_dim("hash_lookup", "keys", keys, torch.int64, 1)
    return keys.new_empty(keys.shape)


def _hash_lookup_out_fake(table_keys, bucket_size, keys, missing, out) -> None:
    _check_dtype_dim("hash_lookup", "keys", keys, torch.int64, 1)
    _check_dtype_dim("hash_lookup", "out", out, torch.int64, 1)


def _hash_insert_fake(table_keys: torch.Tensor, table_scores: torch.Tensor, bucket_size: int,
                      keys: torch.Tensor, scores: torch.Tensor):
    """(slots int64 [n], evicted_keys int64 [v], evicted_slots int64 [v]), v data-dependent."""
    _check_dtype_dim("hash_insert", "keys", keys, torch.int64, 1)
    _check_dtype_dim("hash_insert", "scores", scores, torch.float32, 1)
    torch._check(
        scores.shape[0] == keys.shape[0],
        lambda: f"[torchrec_fiited] fiited::hash_insert: scores must have one score per key, got "
        f"{scores.shape[0]} vs {keys.shape[0]}",
    )
    v = torch.library.get_ctx().new_dynamic_size()
    return keys.new_empty(keys.shape), keys.new_empty((v,)), keys.new_empty((v,))


def _hash_erase_fake(table_keys: torch.Tensor, table_scores: torch.Tensor, bucket_size: int,
                     keys: torch.Tensor):
    """The number of erased keys, a 0-D int64 tensor."""
    _check_dtype_dim("hash_erase", "keys", keys, torch.int64, 1)
    return keys.new_empty(())


if HASH_DEVICES:
    torch.library.register_fake("fiited::hash_lookup")(_hash_lookup_fake)
    torch.library.register_fake("fiited::hash_lookup_out")(_hash_lookup_out_fake)
    torch.library.register_fake("fiited::hash_insert")(_hash_insert_fake)
    torch.library.register_fake("fiited::hash_erase")(_hash_erase_fake)


# ---- utility sketch ops (cuda/fiited_sketch_cpu.cpp; store/sketch.py) ---------------------------


def _sketch_estimate_fake(counts: torch.Tensor, keys: torch.Tensor, salts) -> torch.Tensor:
    """Estimates fp32 [n, K] for keys int64 [n]."""
    _check_dtype_dim("sketch_estimate", "counts", counts, torch.bfloat16, 3)
    _check_dtype_dim("sketch_estimate", "keys", keys, torch.int64, 1)
    return counts.new_empty((keys.shape[0], counts.shape[2]), dtype=torch.float32)


def _sketch_raise_fake(counts, keys, values, add, salts) -> None:
    _check_dtype_dim("sketch_raise", "counts", counts, torch.bfloat16, 3)
    _check_dtype_dim("sketch_raise", "keys", keys, torch.int64, 1)
    _check_dtype_dim("sketch_raise", "values", values, torch.float32, 2)


if SKETCH_DEVICES:
    torch.library.register_fake("fiited::sketch_estimate")(_sketch_estimate_fake)
    torch.library.register_fake("fiited::sketch_raise")(_sketch_raise_fake)


# ---- chunk initialisation (cuda/fiited_init_cpu.cpp; store/vhpi.py) ----------------------------


def _counter_uniform_grid_fake(prefix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                               tail) -> torch.Tensor:
    """Uniforms fp32 [n, w] for prefix and rows int64 [n] and cols int64 [n, w]."""
    _check_dtype_dim("counter_uniform_grid", "rows", rows, torch.int64, 1)
    _check_dtype_dim("counter_uniform_grid", "cols", cols, torch.int64, 2)
    return cols.new_empty(cols.shape, dtype=torch.float32)


if INIT_DEVICES:
    torch.library.register_fake("fiited::counter_uniform_grid")(_counter_uniform_grid_fake)


def _feature_keys_fake(ids, id_starts, key_base, row_offset, num_entries, hash):
    """(keys int64 [n], first_bad int64 [])."""
    torch._check(
        ids.dim() == 1 and ids.dtype in (torch.int32, torch.int64),
        lambda: "[torchrec_fiited] fiited::feature_keys: ids must be a 1-D int32/int64 tensor",
    )
    return ids.new_empty(ids.shape, dtype=torch.int64), ids.new_empty((), dtype=torch.int64)


def _feature_keys_out_fake(ids, id_starts, key_base, row_offset, num_entries, hash, keys):
    """first_bad int64 []; keys written in place."""
    return ids.new_empty((), dtype=torch.int64)


def _row_permutation_fake(rows, id_starts, num_rows, shift, inverse):
    """Permuted rows int64 [n]."""
    return rows.new_empty(rows.shape, dtype=torch.int64)


def _expand_bags_fake(values, offsets, num_ids):
    """Per-id values int64 [num_ids]."""
    return values.new_empty((num_ids,), dtype=torch.int64)


def _expand_bags_out_fake(values, offsets, out) -> None:
    return None


def _positions_fake(values, *args):
    """Positions int64 [m], m data-dependent."""
    _check_dtype_dim("positions", "values", values, torch.int64, 1)
    return values.new_empty((torch.library.get_ctx().new_dynamic_size(),))


if KEYS_DEVICES:
    torch.library.register_fake("fiited::positions_equal")(_positions_fake)
    torch.library.register_fake("fiited::positions_in")(_positions_fake)
    torch.library.register_fake("fiited::feature_keys")(_feature_keys_fake)
    torch.library.register_fake("fiited::feature_keys_out")(_feature_keys_out_fake)
    torch.library.register_fake("fiited::row_permutation")(_row_permutation_fake)
    torch.library.register_fake("fiited::expand_bags")(_expand_bags_fake)
    torch.library.register_fake("fiited::expand_bags_out")(_expand_bags_out_fake)
