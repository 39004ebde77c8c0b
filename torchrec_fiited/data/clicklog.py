"""A hard, Criteo-shaped synthetic click log where embedding capacity decides the AUC.

The app's default data (``dataset=synthetic``). Methods that store fewer rows or fewer
dimensions lose accuracy here in a measurable, calibrated way (README "Hard synthetic data"):

* Tables span tens to ~10^6 ids at ``cardinality_scale=1`` (Criteo Kaggle's cardinalities,
  clipped), ids heavy-tailed (Zipf, exponent drawn per feature in ``zipf_range``) and scattered
  over the table by a random permutation, one id per example and feature.
* **Tail ids carry a first-order signal**: every id of an informative feature has an additive
  effect ``a(id)`` whose scale fades only slowly with popularity rank ``k``
  (``(1 + k / h) ** -tail_decay``), so rare ids matter if they are kept and learnt.
* **Popular ids need more dimensions than rare ones**: the latent vector ``z(id)`` of an id of
  rank ``k`` has ``r(k)`` active dimensions out of ``latent_dim``: all of them in the head
  (``k < h``, ``h = head_fraction * c``), falling linearly in ``log k`` to none at
  ``k = latent_reach * h``. Pairwise interactions ``sum_{f<f'} <z_f, z_f'>`` (what DLRM's dot
  products model) need about ``r(k)`` embedding dims per id.
* **Some features carry nothing**: ``num_noise_features`` features are pure noise, and the
  dense features carry a small share.

The logit is ``b0 + sum of the three parts``, each scaled on a calibration sample to its share
of ``logit_std ** 2``; ``b0`` gives the mean CTR ``base_ctr``. Train is the first ``num_train``
examples, test the next ``num_test`` (no drift: every split is drawn from the same model).
The model's random draws depend on ``seed`` only; the examples on ``seed`` and the split sizes.
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from torchrec_fiited.data.common import CTRArrays, DatasetSpec
from torchrec_fiited.data.synthetic import (
    calibrate_bias, check_fields, criteo_shaped_spec, sample_dense, sample_zipf_ids, share_scales,
    sigmoid,
)

#: Criteo Kaggle's cardinalities, clipped to [10, 10^6].
CRITEO_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 1000000, 1000000, 305, 24, 12517, 633, 10, 93145, 5683, 1000000, 3194,
    27, 14992, 1000000, 10, 5652, 2173, 10, 1000000, 18, 15, 286181, 105, 142572,
)
_CALIBRATION_ROWS = 50_000
_STREAM_MODEL, _STREAM_CALIBRATION, _STREAM_DATA = 11, 12, 13


@dataclass(frozen=True)
class ClickLogConfig:
    """Knobs of the hard click-log generator (a Hydra structured config).

    Attributes:
        seed: Seed of the model and the examples.
        num_train: Training examples.
        num_test: Test examples.
        num_dense: Dense features.
        num_sparse: Sparse features (the cardinalities repeat past 26).
        cardinality_scale: Multiplies the cardinalities (1.0: up to 10^6 ids; quick runs use
            0.01-0.05). Tables keep at least 4 ids.
        zipf_range: Zipf exponents of the features are drawn uniformly from this range.
        num_noise_features: Sparse features that carry no signal.
        latent_dim: Active latent dimensions of a head id.
        head_fraction: Fraction ``h / c`` of a table's ids (by popularity) in its head.
        latent_reach: Latent dims fade out at rank ``latent_reach * h``.
        tail_decay: First-order effects scale as ``(1 + k / h) ** -tail_decay``.
        dense_share: Share of the logit variance from dense features.
        first_order_share: Share from additive per-id effects.
        interaction_share: Share from pairwise latent interactions.
        logit_std: Standard deviation of the planted logit.
        base_ctr: Mean click probability.
    """

    seed: int = 0
    num_train: int = 1_000_000
    num_test: int = 200_000
    num_dense: int = 13
    num_sparse: int = 26
    cardinality_scale: float = 1.0
    zipf_range: tuple[float, float] = (1.05, 1.25)
    num_noise_features: int = 6
    latent_dim: int = 8
    head_fraction: float = 0.01
    latent_reach: float = 10.0
    tail_decay: float = 0.25
    dense_share: float = 0.1
    first_order_share: float = 0.3
    interaction_share: float = 0.6
    logit_std: float = 2.0
    base_ctr: float = 0.25

    def __post_init__(self) -> None:
        lo, hi = tuple(self.zipf_range)
        checks = [
            ("num_train", self.num_train >= 1), ("num_test", self.num_test >= 1),
            ("num_dense", self.num_dense >= 1), ("num_sparse", self.num_sparse >= 1),
            ("cardinality_scale", self.cardinality_scale > 0),
            ("zipf_range", 0 <= lo <= hi),
            ("num_noise_features", 0 <= self.num_noise_features < self.num_sparse),
            ("latent_dim", self.latent_dim >= 1),
            ("head_fraction", 0 < self.head_fraction <= 1),
            ("latent_reach", self.latent_reach >= 1), ("tail_decay", self.tail_decay >= 0),
            ("logit_std", self.logit_std >= 0), ("base_ctr", 0 < self.base_ctr < 1),
        ]
        for share in ("dense_share", "first_order_share", "interaction_share"):
            checks.append((share, getattr(self, share) >= 0))
        check_fields(self, checks)


def clicklog_cardinalities(cfg: ClickLogConfig) -> tuple[int, ...]:
    """Ids of each sparse feature: ``max(4, round(base_f * cardinality_scale))``."""
    base = CRITEO_CARDINALITIES
    return tuple(max(4, int(round(base[f % len(base)] * cfg.cardinality_scale)))
                 for f in range(cfg.num_sparse))


def latent_ranks(num_ids: int, head: float, reach: float, latent_dim: int) -> np.ndarray:
    """int64 ``[num_ids]``: active latent dims of the id of each popularity rank ``k``.

    ``latent_dim`` for ``k < head``, then falling linearly in ``log k`` to 0 at ``reach * head``
    (``reach = 1``: the head has every dim, the rest none).
    """
    k = np.arange(num_ids, dtype=np.float64)
    if reach <= 1.0:
        return np.where(k < head, latent_dim, 0).astype(np.int64)
    fade = 1.0 - np.log(np.maximum(k, head) / head) / math.log(reach)
    return np.ceil(latent_dim * np.clip(fade, 0.0, 1.0)).astype(np.int64)


@dataclass(frozen=True)
class FeatureModel:
    """Sampling law and planted effects of one sparse feature (arrays indexed by id).

    Attributes:
        cdf: float64 ``[c]`` Zipf CDF over popularity ranks.
        perm: int64 ``[c]`` id of each popularity rank.
        first_order: float64 ``[c]`` additive effects, or None for a noise feature.
        latent: float32 ``[c, latent_dim]`` latent vectors (zero past each id's rank), or None.
    """

    cdf: np.ndarray
    perm: np.ndarray
    first_order: Optional[np.ndarray]
    latent: Optional[np.ndarray]


class ClickLogModel:
    """The hidden label model (see the module docstring).

    Attributes:
        cfg: Its configuration.
        cardinalities: Ids per sparse feature.
        informative: bool ``[num_sparse]``, features that carry signal.
        features: Per-feature sampling law and effects.
    """

    def __init__(self, cfg: ClickLogConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, _STREAM_MODEL])
        self.cardinalities = clicklog_cardinalities(cfg)
        self.informative = np.ones(cfg.num_sparse, dtype=bool)
        self.informative[rng.choice(cfg.num_sparse, cfg.num_noise_features, replace=False)] = False
        exponents = rng.uniform(*tuple(cfg.zipf_range), size=cfg.num_sparse)
        strengths = np.exp(rng.uniform(math.log(0.5), math.log(1.5), size=cfg.num_sparse))
        self.features = [
            self._feature(c, float(a), float(s), bool(inf), rng)
            for c, a, s, inf in zip(self.cardinalities, exponents, strengths, self.informative)
        ]
        self._dense_mu = rng.uniform(0.0, 4.0, cfg.num_dense)
        self._dense_sigma = rng.uniform(0.5, 1.5, cfg.num_dense)
        self.dense_weights = rng.standard_normal(cfg.num_dense)
        self._dense_mean = np.zeros(cfg.num_dense)
        self._dense_std = np.ones(cfg.num_dense)
        self._scales = np.zeros(3)
        self.bias = 0.0
        self._calibrate()

    def _feature(self, c: int, exponent: float, strength: float, informative: bool,
                 rng: np.random.Generator) -> FeatureModel:
        cfg = self.cfg
        ranks = np.arange(c, dtype=np.float64)
        cdf = np.cumsum((ranks + 1.0) ** -exponent)
        cdf /= cdf[-1]
        perm = rng.permutation(c)
        if not informative:
            return FeatureModel(cdf, perm, None, None)
        head = max(1.0, cfg.head_fraction * c)
        by_rank = strength * (1.0 + ranks / head) ** -cfg.tail_decay
        first_order = np.empty(c)
        first_order[perm] = by_rank * rng.standard_normal(c)
        # Dims beyond an id's rank are zero: a rare id's interactions live in few dims.
        active = latent_ranks(c, head, cfg.latent_reach, cfg.latent_dim)
        mask = np.arange(cfg.latent_dim)[None, :] < active[:, None]
        basis, _ = np.linalg.qr(rng.standard_normal((cfg.latent_dim, cfg.latent_dim)))
        coords = rng.standard_normal((c, cfg.latent_dim)) * mask * strength
        latent = np.empty((c, cfg.latent_dim), dtype=np.float32)
        latent[perm] = coords @ basis.T
        return FeatureModel(cdf, perm, first_order, latent)

    def sample_inputs(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Dense float32 ``[n, num_dense]`` (log1p counts) and ids int64 ``[n, num_sparse]``."""
        dense = sample_dense(self._dense_mu, self._dense_sigma, n, rng)
        return dense, sample_zipf_ids([(f.cdf, f.perm) for f in self.features], n, rng)

    def logit_parts(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float64 ``[3, n]`` unscaled parts: dense, first-order, interaction."""
        n = ids.shape[0]
        parts = np.zeros((3, n))
        parts[0] = ((dense - self._dense_mean) / self._dense_std) @ self.dense_weights
        latent_sum = np.zeros((n, self.cfg.latent_dim), dtype=np.float32)
        for f, feature in enumerate(self.features):
            if feature.first_order is None:
                continue
            parts[1] += feature.first_order[ids[:, f]]
            z = feature.latent[ids[:, f]]
            latent_sum += z
            parts[2] -= 0.5 * np.einsum("nk,nk->n", z, z)
        # sum_{f < f'} <z_f, z_f'> = (|sum_f z_f|^2 - sum_f |z_f|^2) / 2
        parts[2] += 0.5 * np.einsum("nk,nk->n", latent_sum, latent_sum)
        return parts

    def logits(self, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """True logits, float64 ``[n]``."""
        return self.bias + self._scales @ self.logit_parts(dense, ids)

    def sample(self, n: int, rng: np.random.Generator) -> CTRArrays:
        """``n`` examples with labels and true logits."""
        dense, ids = self.sample_inputs(n, rng)
        logits = self.logits(dense, ids)
        labels = (rng.random(n) < sigmoid(logits)).astype(np.float32)
        return CTRArrays(dense=dense, sparse=ids, labels=labels, logits=logits.astype(np.float32))

    def _calibrate(self) -> None:
        """Dense standardization, part scales and the bias, on a sample of their own."""
        rng = np.random.default_rng([self.cfg.seed, _STREAM_CALIBRATION])
        dense, ids = self.sample_inputs(_CALIBRATION_ROWS, rng)
        self._dense_mean = dense.mean(axis=0, dtype=np.float64)
        self._dense_std = np.maximum(dense.std(axis=0, dtype=np.float64), 1e-6)
        parts = self.logit_parts(dense, ids)
        self._scales = share_scales(
            parts, (self.cfg.dense_share, self.cfg.first_order_share, self.cfg.interaction_share),
            self.cfg.logit_std)
        self.bias = calibrate_bias(self._scales @ parts, self.cfg.base_ctr)


def clicklog_spec(cfg: ClickLogConfig) -> DatasetSpec:
    """The DatasetSpec of :func:`make_clicklog`'s data for ``cfg`` (no data drawn)."""
    return criteo_shaped_spec("synthetic", cfg.num_dense, clicklog_cardinalities(cfg),
                              cfg.num_train)


def make_clicklog(cfg: ClickLogConfig) -> tuple[CTRArrays, CTRArrays, DatasetSpec]:
    """Generates ``(train, test, spec)`` (arrays as in :class:`CTRArrays`, true logits included)."""
    model = ClickLogModel(cfg)
    rng = np.random.default_rng([cfg.seed, _STREAM_DATA])
    train = model.sample(cfg.num_train, rng)
    test = model.sample(cfg.num_test, rng)
    return train, test, clicklog_spec(cfg)
