"""Writes a MovieLens-format ``ratings.csv`` with a planted model, for experiments on data with
few sparse features (two: user and movie), where every id's own embedding carries the signal.

Users and movies are drawn Zipf-like (``rank % count`` of Zipf(1.3) and Zipf(1.2) draws); a
rating is ``round(3.5 + <u, v> / 2 + b_u + b_v + noise)`` clipped to 1-5, with k=16 Gaussian
factors and biases, timestamps increasing. The app binarises it (4 and 5 stars positive) and
tests on the last 10% in time order, as for the real files:

    python benchmarks/make_ratings_log.py --seed 0 --out /tmp/ml/ratings_0.csv
    python -m torchrec_fiited.train dataset=movielens dataset.path=/tmp/ml/ratings_0.csv \\
        model.embedding_dim=64 'model.dense_arch=[64,64]' emb=fiited budget=0.1 seed=0
"""

import argparse
import os

import numpy as np


def write(path: str, seed: int, users: int, movies: int, ratings: int, factors: int = 16) -> float:
    """Writes the file; returns the fraction of ratings >= 4."""
    rng = np.random.default_rng(seed)
    user = rng.zipf(1.3, ratings) % users
    movie = rng.zipf(1.2, ratings) % movies
    uf, mf = rng.normal(size=(users, factors)), rng.normal(size=(movies, factors))
    ub, mb = rng.normal(size=users), rng.normal(size=movies)
    score = (uf[user] * mf[movie]).sum(1) / 2 + ub[user] + mb[movie] + rng.normal(size=ratings)
    rating = np.clip(np.round(3.5 + score), 1, 5)
    timestamp = np.sort(rng.integers(10**9, 10**9 + 10**8, ratings))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for u, m, r, t in zip(user + 1, movie + 1, rating, timestamp):
            f.write(f"{u},{m},{r:.1f},{t}\n")
    return float((rating >= 4).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--users", type=int, default=30_000)
    parser.add_argument("--movies", type=int, default=6_000)
    parser.add_argument("--ratings", type=int, default=1_500_000)
    args = parser.parse_args()
    positive = write(args.out, args.seed, args.users, args.movies, args.ratings)
    print(f"wrote {args.out}: {args.ratings:,} ratings, {positive:.1%} positive")


if __name__ == "__main__":
    main()
