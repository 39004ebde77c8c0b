"""Criteo-shaped synthetic CTR data with a planted, known label model.

The data has the shape of Criteo (13 dense, 26 sparse features by default) and a
hidden label model whose information is deliberately uneven, so that methods
that size or prune embeddings per feature, per row and per dimension can be told
apart. Everything is deterministic given :class:`SyntheticConfig` (the seed
included) and vectorized with numpy.

Generative process
------------------
Cardinalities. Sparse feature ``f`` has ``c_f = max(2, round(base_f *
cardinality_scale))`` values, ``base_f`` from :data:`BASE_CARDINALITIES` (Criteo's
cardinalities clipped to between 10 and 1e5), repeated if ``num_sparse > 26``.

Ids. Per feature, a popularity rank ``k`` is drawn from a Zipf law truncated to
``[0, c_f)``: ``P(k) ∝ (k + 1) ** -zipf_exponent``; the id is ``perm_f[k]`` for a
fixed random permutation ``perm_f``, so popular ids are scattered over the table.
Each example has exactly one id per feature (no missing values).

Dense features. ``counts_j = max(floor(exp(N(mu_j, sigma_j))) - 1, 0)`` and the
dense input is ``log(1 + counts_j)`` (the DLRM transform), float32.

Planted logit (time ``t`` in [0, 1] is the example index over all examples)::

    logit = b0 + a_dense * D + a_add * A + a_int * I

* ``D = sum_j w_j * standardized(dense_j)`` over ``num_informative_dense``
  features with random weights; the others carry nothing.
* Across features: only ``num_informative`` sparse features carry signal, with a
  strength ``s_f`` (log-uniform in [0.3, 1.5]); the rest are pure noise.
* Across rows: the per-id effects of feature ``f`` are scaled by
  ``g(k) = (1 + k / h_f) ** -0.5`` with ``h_f = max(1, head_fraction * c_f)``:
  popular ids carry a learnable effect, rare tail ids hardly any (and are too
  rare to learn anyway).
* Across dimensions: informative feature ``f`` has a latent rank ``r_f`` cycling
  through ``(latent_dim, latent_dim // 2, 1, 0)``. Its per-id latent vector is
  ``z_f(id) = s_f * g(k) * B_f u``, with ``u ~ N(0, I_{r_f})`` and ``B_f`` a random
  ``latent_dim x r_f`` orthonormal basis; ``I = sum_{f < f'} <z_f, z_f'>`` is an
  FM/DLRM-style pairwise interaction, so a feature needs about ``r_f`` embedding
  dimensions for ``I`` (plus one for its additive effect), and noise features none.
* ``A = sum_f s_f * g(k) * e_f(id)`` with ``e_f(id) ~ N(0, 1)``: an additive
  per-id effect of every informative feature (what a 1-d embedding can hold).
* Drift: every per-id table exists twice (``e0, e1``, ``z0, z1``); at time ``t``
  the model uses ``cos(phi) * x0 + sin(phi) * x1`` with
  ``phi = drift * t * pi / 2``. ``drift = 0``: static; ``drift = 1``: by the last
  example the effects have rotated into independent new ones. The variance of
  each effect stays the same.
* Calibration: on a fixed calibration sample (its own random stream, so the model
  does not depend on ``num_train``), ``D``, ``A``, ``I`` are scaled to variance
  shares ``dense_share``, ``additive_share``, ``interaction_share`` of
  ``logit_std ** 2``; then ``b0`` is set by bisection so the mean click
  probability is ``base_ctr``.

Label: ``Bernoulli(sigmoid(logit))``. Train is the first ``num_train`` examples in
time, test the last ``num_test``; ``CTRArrays.logits`` holds the true logits.
With the defaults the true model reaches a test AUC of about 0.78 at a CTR of
about 0.25, and 600k examples take about 2 s to generate.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from torchrec_fiited.data.common import CTRArrays, DatasetSpec

#: Criteo Kaggle cardinalities, clipped to [10, 100000].
BASE_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 100000, 100000, 305, 24, 12517, 633, 10, 93145, 5683, 100000, 3194,
    27, 14992, 100000, 10, 5652, 2173, 10, 100000, 18, 15, 100000, 105, 100000,
)
_CALIBRATION_ROWS = 20_000
_STREAM_MODEL, _STREAM_CALIBRATION, _STREAM_DATA = 1, 2, 3


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic generator (a Hydra structured config).

    Attributes:
        seed: Seed of every random choice (model and data).
        num_train: Training examples (the first in time).
        num_test: Test examples (the last in time).
        num_dense: Dense features.
        num_sparse: Sparse features.
        cardinality_scale: Multiplies the base cardinalities (e.g. 0.01 for tests).
        zipf_exponent: Exponent of the Zipf id distribution (1.05-1.2 is Criteo-like).
        num_informative: Sparse features that carry signal.
        num_informative_dense: Dense features that carry signal.
        latent_dim: Largest latent rank of a feature's per-id vectors.
        head_fraction: Fraction of a feature's ids (by popularity) with full-strength effects.
        dense_share: Share of the logit variance from dense features.
        additive_share: Share from additive per-id effects.
        interaction_share: Share from pairwise latent interactions.
        logit_std: Standard deviation of the planted logit (sets the reachable AUC).
        base_ctr: Mean click probability.
        drift: Rotation of the per-id effects over time, 0 (none) to 1 (full).
    """

    seed: int = 0
    num_train: int = 500_000
    num_test: int = 100_000
    num_dense: int = 13
    num_sparse: int = 26
    cardinality_scale: float = 1.0
    zipf_exponent: float = 1.1
    num_informative: int = 12
    num_informative_dense: int = 5
    latent_dim: int = 4
    head_fraction: float = 0.01
    dense_share: float = 0.2
    additive_share: float = 0.4
    interaction_share: float = 0.4
    logit_std: float = 1.3
    base_ctr: float = 0.25
    drift: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            ("num_train", self.num_train >= 1), ("num_test", self.num_test >= 1),
            ("num_dense", self.num_dense >= 1), ("num_sparse", self.num_sparse >= 1),
            ("cardinality_scale", self.cardinality_scale > 0),
            ("zipf_exponent", self.zipf_exponent >= 0),
            ("num_informative", 0 <= self.num_informative <= self.num_sparse),
            ("num_informative_dense", 0 <= self.num_informative_dense <= self.num_dense),
            ("latent_dim", self.latent_dim >= 1),
            ("head_fraction", 0 < self.head_fraction <= 1),
            ("logit_std", self.logit_std >= 0), ("base_ctr", 0 < self.base_ctr < 1),
            ("drift", 0 <= self.drift <= 1),
        ]
        for share in ("dense_share", "additive_share", "interaction_share"):
            checks.append((share, getattr(self, share) >= 0))
        check_fields(self, checks)


def check_fields(config: object, checks: Sequence[tuple[str, bool]]) -> None:
    """Raises ValueError naming ``<Class>.<field> = value`` for the first failed check."""
    for field, ok in checks:
        if not ok:
            value = getattr(config, field)
            raise ValueError(f"{type(config).__name__}.{field} = {value!r} is out of range")


@dataclass(frozen=True)
class FeatureTruth:
    """What the planted model puts into one sparse feature.

    Attributes:
        name: Feature name (``cat_<f>``).
        cardinality: Number of ids.
        informative: Whether the feature carries any signal.
        rank: Latent rank of its per-id vectors (0: additive effect only or noise).
        strength: Effect scale ``s_f`` (0 for noise features).
        head_size: ``h_f``, the number of popular ids with near-full effects.
    """

    name: str
    cardinality: int
    informative: bool
    rank: int
    strength: float
    head_size: int


def synthetic_cardinalities(cfg: SyntheticConfig) -> tuple[int, ...]:
    """Number of ids of each sparse feature: ``max(2, round(base_f * cardinality_scale))``."""
    base = BASE_CARDINALITIES
    return tuple(max(2, int(round(base[f % len(base)] * cfg.cardinality_scale)))
                 for f in range(cfg.num_sparse))


def _feature_truths(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[FeatureTruth, ...]:
    """Draws which sparse features are informative, with their ranks and strengths."""
    informative = np.sort(rng.choice(cfg.num_sparse, size=cfg.num_informative, replace=False))
    rank_cycle = (cfg.latent_dim, cfg.latent_dim // 2, 1, 0)
    strengths = np.exp(rng.uniform(math.log(0.3), math.log(1.5), size=cfg.num_sparse))
    truths = []
    for f, card in enumerate(synthetic_cardinalities(cfg)):
        hits = np.flatnonzero(informative == f)
        rank = rank_cycle[int(hits[0]) % len(rank_cycle)] if hits.size else 0
        truths.append(FeatureTruth(
            name=f"cat_{f}", cardinality=card, informative=bool(hits.size), rank=rank,
            strength=float(strengths[f]) if hits.size else 0.0,
            head_size=max(1, int(round(cfg.head_fraction * card))),
        ))
    return tuple(truths)


@dataclass(frozen=True)
class FeatureTables:
    """Per-feature sampling and effect tables (all indexed by id unless said otherwise).

    Attributes:
        cdf: float64 ``[c]`` Zipf CDF over popularity ranks.
        perm: int64 ``[c]`` id of each popularity rank.
        additive: float64 ``[2, c]`` additive effects before/after drift, or None
            for a noise feature.
        latent: float64 ``[2, c, latent_dim]`` latent vectors before/after drift
            (rank ``r_f`` each), or None when ``r_f = 0``.
    """

    cdf: np.ndarray
    perm: np.ndarray
    additive: Optional[np.ndarray]
    latent: Optional[np.ndarray]


def _build_tables(truth: FeatureTruth, cfg: SyntheticConfig,
                  rng: np.random.Generator) -> FeatureTables:
    """Draws the Zipf law, the id permutation and the planted per-id effects of one feature."""
    c = truth.cardinality
    ranks = np.arange(c, dtype=np.float64)
    weights = (ranks + 1.0) ** -cfg.zipf_exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    perm = rng.permutation(c)
    if not truth.informative:
        return FeatureTables(cdf=cdf, perm=perm, additive=None, latent=None)
    # g(k): full effect for the popular head, fading over the tail; stored by id.
    scale_by_rank = truth.strength * (1.0 + ranks / truth.head_size) ** -0.5
    scale = np.empty(c)
    scale[perm] = scale_by_rank
    additive = scale * rng.standard_normal((2, c))
    latent = None
    if truth.rank > 0:
        basis, _ = np.linalg.qr(rng.standard_normal((cfg.latent_dim, truth.rank)))
        coords = rng.standard_normal((2, c, truth.rank))
        latent = scale[None, :, None] * (coords @ basis.T)
    return FeatureTables(cdf=cdf, perm=perm, additive=additive, latent=latent)


def _drifted(table: np.ndarray, ids: np.ndarray, cos: np.ndarray,
             sin: Optional[np.ndarray]) -> np.ndarray:
    """``cos * table[0][ids] + sin * table[1][ids]``; cos, sin float64 ``[n]`` broadcast on rows.

    ``sin = None`` means no drift: the first table alone, unscaled.
    """
    if sin is None:
        return table[0][ids]
    shape = (-1,) + (1,) * (table.ndim - 2)
    return cos.reshape(shape) * table[0][ids] + sin.reshape(shape) * table[1][ids]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Elementwise logistic function, float64."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def calibrate_bias(signal: np.ndarray, base_ctr: float) -> float:
    """The intercept ``b`` with ``mean(sigmoid(b + signal)) = base_ctr``, by bisection (the mean
    CTR is increasing in ``b``)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sigmoid(mid + signal).mean() < base_ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def share_scales(parts: np.ndarray, shares: Sequence[float], logit_std: float) -> np.ndarray:
    """float64 ``[P]``: scales that give each row of ``parts`` ``[P, n]`` its share of
    ``logit_std ** 2`` (shares normalised to sum 1); a part with no variance (e.g. no informative
    feature) gets 0 and contributes nothing."""
    shares = np.asarray(shares, dtype=np.float64)
    shares = shares / shares.sum() if shares.sum() > 0 else shares
    stds = parts.std(axis=1)
    return np.where(stds > 0, np.sqrt(shares) * logit_std / np.maximum(stds, 1e-12), 0.0)


def sample_dense(mu: np.ndarray, sigma: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ``[n, len(mu)]`` DLRM-transformed counts ``log1p(max(floor(exp(N(mu, sigma))) - 1,
    0))``."""
    normal = rng.standard_normal((n, mu.size), dtype=np.float32)
    counts = np.floor(np.exp(mu.astype(np.float32) + sigma.astype(np.float32) * normal)) - 1.0
    return np.log1p(np.maximum(counts, 0.0, out=counts), out=counts)


def sample_zipf_ids(laws: Sequence[tuple[np.ndarray, np.ndarray]], n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """int64 ``[n, F]``: for each feature's ``(cdf over popularity ranks, id of each rank)``, ``n``
    ids drawn by inverting the CDF."""
    ids = np.empty((len(laws), n), dtype=np.int64)  # filled row by row: fast
    for f, (cdf, perm) in enumerate(laws):
        ranks = np.searchsorted(cdf, rng.random(n), side="right")
        ids[f] = perm[np.minimum(ranks, cdf.size - 1)]
    return np.ascontiguousarray(ids.T)


def criteo_shaped_spec(name: str, num_dense: int, cardinalities: Sequence[int],
                       num_train: int) -> DatasetSpec:
    """DatasetSpec of generated data: dense ``int_<j>``, sparse ``cat_<f>`` as Criteo in torchrec."""
    return DatasetSpec(
        name=name,
        dense_names=tuple(f"int_{j}" for j in range(num_dense)),
        sparse_names=tuple(f"cat_{f}" for f in range(len(cardinalities))),
        num_embeddings=tuple(cardinalities),
        num_train_examples=num_train,
    )


class PlantedModel:
    """The hidden label model of the synthetic data (see the module docstring).

    Attributes:
        cfg: The configuration it was built from.
        features: What each sparse feature carries.
        tables: Sampling and effect tables of each sparse feature.
        dense_weights: float64 ``[num_dense]`` weights on standardized dense inputs.
        bias: ``b0``, the intercept that gives the requested base CTR.
    """

    def __init__(self, cfg: SyntheticConfig) -> None:
        """Draws the model from ``cfg.seed`` and calibrates it."""
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, _STREAM_MODEL])
        self.features = _feature_truths(cfg, rng)
        self.tables = [_build_tables(t, cfg, rng) for t in self.features]
        self._dense_mu = rng.uniform(0.0, 4.0, cfg.num_dense)
        self._dense_sigma = rng.uniform(0.5, 1.5, cfg.num_dense)
        self.dense_weights = np.zeros(cfg.num_dense)
        chosen = rng.choice(cfg.num_dense, size=cfg.num_informative_dense, replace=False)
        self.dense_weights[chosen] = rng.standard_normal(chosen.size)
        self._dense_mean = np.zeros(cfg.num_dense)
        self._dense_std = np.ones(cfg.num_dense)
        self._part_scales = np.zeros(3)
        self.bias = 0.0
        self._calibrate()

    def sample_inputs(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draws features of ``n`` examples.

        Returns:
            ``(dense, ids)``: float32 ``[n, num_dense]`` log1p counts and int64
            ``[n, num_sparse]`` ids, ``ids[:, f] < features[f].cardinality``.
        """
        dense = sample_dense(self._dense_mu, self._dense_sigma, n, rng)
        return dense, sample_zipf_ids([(t.cdf, t.perm) for t in self.tables], n, rng)

    def logit_parts(self, dense: np.ndarray, ids: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Unscaled logit components of examples.

        Args:
            dense: float32 ``[n, num_dense]`` dense inputs.
            ids: int64 ``[n, num_sparse]`` ids.
            t: float64 ``[n]`` times in [0, 1].

        Returns:
            float64 ``[3, n]``: dense part D, additive part A, interaction part I.
        """
        phi = self.cfg.drift * t * (math.pi / 2.0)
        cos, sin = np.cos(phi), (np.sin(phi) if self.cfg.drift > 0 else None)
        standardized = (dense - self._dense_mean) / self._dense_std
        parts = np.zeros((3, ids.shape[0]))
        parts[0] = standardized @ self.dense_weights
        latent_sum = np.zeros((ids.shape[0], self.cfg.latent_dim))
        for f, tables in enumerate(self.tables):
            if tables.additive is not None:
                parts[1] += _drifted(tables.additive, ids[:, f], cos, sin)
            if tables.latent is not None:
                z = _drifted(tables.latent, ids[:, f], cos, sin)
                latent_sum += z
                parts[2] -= 0.5 * np.einsum("nk,nk->n", z, z)
        # sum_{f < f'} <z_f, z_f'> = (|sum_f z_f|^2 - sum_f |z_f|^2) / 2
        parts[2] += 0.5 * np.einsum("nk,nk->n", latent_sum, latent_sum)
        return parts

    def logits(self, dense: np.ndarray, ids: np.ndarray, t: np.ndarray) -> np.ndarray:
        """True logits, float64 ``[n]`` (arguments as in :meth:`logit_parts`)."""
        return self.bias + self._part_scales @ self.logit_parts(dense, ids, t)

    def sample(self, t: np.ndarray, rng: np.random.Generator) -> CTRArrays:
        """One example per time in ``t`` (float64 ``[n]`` in [0, 1]), with labels and logits."""
        dense, ids = self.sample_inputs(t.shape[0], rng)
        logits = self.logits(dense, ids, t)
        labels = (rng.random(t.shape[0]) < sigmoid(logits)).astype(np.float32)
        return CTRArrays(dense=dense, sparse=ids, labels=labels, logits=logits.astype(np.float32))

    def _calibrate(self) -> None:
        """Sets dense standardization, component scales and the bias on a calibration sample."""
        rng = np.random.default_rng([self.cfg.seed, _STREAM_CALIBRATION])
        dense, ids = self.sample_inputs(_CALIBRATION_ROWS, rng)
        self._dense_mean = dense.mean(axis=0, dtype=np.float64)
        self._dense_std = np.maximum(dense.std(axis=0, dtype=np.float64), 1e-6)
        parts = self.logit_parts(dense, ids, rng.random(_CALIBRATION_ROWS))
        self._part_scales = share_scales(
            parts, (self.cfg.dense_share, self.cfg.additive_share, self.cfg.interaction_share),
            self.cfg.logit_std)
        self.bias = calibrate_bias(self._part_scales @ parts, self.cfg.base_ctr)


def synthetic_spec(cfg: SyntheticConfig) -> DatasetSpec:
    """The DatasetSpec of the data :func:`make_synthetic` makes for ``cfg`` (no data drawn)."""
    return criteo_shaped_spec("synthetic", cfg.num_dense, synthetic_cardinalities(cfg),
                              cfg.num_train)


def make_synthetic(cfg: SyntheticConfig) -> tuple[CTRArrays, CTRArrays, DatasetSpec]:
    """Generates the synthetic train and test splits.

    Args:
        cfg: Generator configuration.

    Returns:
        ``(train, test, spec)``: each split has dense float32 ``[N, num_dense]``,
        sparse int64 ``[N, num_sparse]``, labels float32 ``[N]`` and the true
        logits float32 ``[N]``; train is the first ``num_train`` examples in time.
    """
    model = PlantedModel(cfg)
    n = cfg.num_train + cfg.num_test
    data = model.sample(np.arange(n) / max(n - 1, 1),
                        np.random.default_rng([cfg.seed, _STREAM_DATA]))
    train, test = data.take(slice(0, cfg.num_train)), data.take(slice(cfg.num_train, n))
    return train, test, synthetic_spec(cfg)
