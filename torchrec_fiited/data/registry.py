"""One entry point that loads any supported dataset as torchrec batches.

The Hydra app passes its ``dataset`` config group as keyword arguments::

    train, test, spec = load_dataset(**cfg.dataset)   # cfg.dataset.name = "criteo", ...

Batching options (``batch_size``, ``test_batch_size``, ``drop_last``, ``shuffle``,
``shuffle_seed``) are handled here; every other option goes to the dataset's
loader: :class:`~torchrec_fiited.data.clicklog.ClickLogConfig` fields for ``synthetic``
(the hard click log), :class:`~torchrec_fiited.data.synthetic.SyntheticConfig` fields for
``synthetic_easy`` (the first planted model), the keyword arguments of
:func:`~torchrec_fiited.data.criteo.load_criteo`,
:func:`~torchrec_fiited.data.avazu.load_avazu` and
:func:`~torchrec_fiited.data.movielens.load_movielens` for the others. Relative
paths are taken relative to the current directory (under Hydra, pass them through
``hydra.utils.to_absolute_path`` first).
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
from torchrec.datasets.utils import Batch

from torchrec_fiited.data.avazu import load_avazu
from torchrec_fiited.data.common import CTRArrays, DatasetSpec, make_batches
from torchrec_fiited.data.criteo import load_criteo
from torchrec_fiited.data.movielens import load_movielens
from torchrec_fiited.data.clicklog import ClickLogConfig, make_clicklog
from torchrec_fiited.data.synthetic import SyntheticConfig, make_synthetic

Loaded = tuple[CTRArrays, CTRArrays, DatasetSpec]


def _load_synthetic(**options: Any) -> Loaded:
    """The hard click log: builds a ClickLogConfig from the options and generates the data."""
    if "zipf_range" in options:  # Hydra passes a ListConfig
        options["zipf_range"] = tuple(float(x) for x in options["zipf_range"])
    return make_clicklog(ClickLogConfig(**options))


def _load_synthetic_easy(**options: Any) -> Loaded:
    """The first planted model: builds a SyntheticConfig and generates the data."""
    train, test, spec = make_synthetic(SyntheticConfig(**options))
    return train, test, dataclasses.replace(spec, name="synthetic_easy")


_LOADERS: dict[str, Callable[..., Loaded]] = {
    "synthetic": _load_synthetic,
    "synthetic_easy": _load_synthetic_easy,
    "criteo": load_criteo,
    "avazu": load_avazu,
    "movielens": load_movielens,
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "synthetic": tuple(f.name for f in dataclasses.fields(ClickLogConfig)),
    "synthetic_easy": tuple(f.name for f in dataclasses.fields(SyntheticConfig)),
    **{name: tuple(p for p in inspect.signature(fn).parameters if p != "name")
       for name, fn in _LOADERS.items() if not name.startswith("synthetic")},
}
#: Names accepted by :func:`load_dataset`.
SUPPORTED_DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_arrays(name: str, **options: Any) -> Loaded:
    """Loads a dataset as in-memory arrays.

    Args:
        name: One of :data:`SUPPORTED_DATASETS`.
        **options: The loader's options (see the module docstring).

    Returns:
        ``(train, test, spec)`` arrays and the dataset spec.

    Raises:
        ValueError: On an unknown name or option (the message lists the valid ones),
            or any error of the loader.
    """
    if name not in _LOADERS:
        raise ValueError(
            f"unknown dataset {name!r}; supported datasets: {', '.join(SUPPORTED_DATASETS)}"
        )
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; accepted: "
            f"{', '.join(_OPTIONS[name])}, plus batch_size, test_batch_size, drop_last, "
            "shuffle, shuffle_seed"
        )
    return _LOADERS[name](**options)


def load_dataset(
    name: str,
    batch_size: int = 2048,
    test_batch_size: Optional[int] = None,
    drop_last: bool = False,
    shuffle: bool = False,
    shuffle_seed: int = 0,
    **options: Any,
) -> tuple[list[Batch], list[Batch], DatasetSpec]:
    """Loads a dataset and cuts it into torchrec batches.

    Args:
        name: One of :data:`SUPPORTED_DATASETS`.
        batch_size: Training batch size.
        test_batch_size: Test batch size (default: ``batch_size``).
        drop_last: Drop a final short training batch (test batches are all kept).
        shuffle: Shuffle the training examples once (otherwise time order is kept).
        shuffle_seed: Seed of that shuffle.
        **options: The loader's options (see the module docstring).

    Returns:
        ``(train_batches, test_batches, spec)``. Each batch has dense_features
        float32 ``[B, spec.num_dense]``, sparse_features a KeyedJaggedTensor keyed by
        ``spec.sparse_names`` with one int64 id per example and key, and labels
        float32 ``[B]``.

    Raises:
        ValueError: On an unknown name or option, or any error of the loader.
        FileNotFoundError: If a data file does not exist.
    """
    train, test, spec = load_arrays(name, **options)
    if shuffle:
        train = train.take(np.random.default_rng(shuffle_seed).permutation(len(train)))
    test_bs = batch_size if test_batch_size is None else test_batch_size
    return (
        make_batches(train, batch_size, spec.sparse_names, drop_last=drop_last),
        make_batches(test, test_bs, spec.sparse_names, drop_last=False),
        spec,
    )
