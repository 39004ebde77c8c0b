"""benchmarks/make_ratings_log.py writes a ratings.csv that the MovieLens reader loads whole, with
the planted labels (rating >= 4) and the Zipf-skewed ids it describes."""

import numpy as np

from tests.scripts import load_script
from torchrec_fiited.data.movielens import load_movielens


def test_written_log_loads_with_its_labels(tmp_path):
    module = load_script("benchmarks/make_ratings_log.py")
    path = tmp_path / "ratings.csv"
    positive = module.write(str(path), seed=3, users=500, movies=100, ratings=4000)
    train, test, ds = load_movielens(path, progress=False, cache=False)
    assert len(train) + len(test) == 4000 and len(test) == 400
    labels = np.concatenate([train.labels, test.labels])
    assert abs(labels.mean() - positive) < 1e-9
    assert list(ds.sparse_names) == ["user_id", "movie_id"]
    # Zipf-skewed: the most frequent user has far more than the mean share of ratings.
    users = np.concatenate([train.sparse[:, 0], test.sparse[:, 0]])
    assert np.bincount(users).max() > 20 * len(users) / len(np.unique(users))
