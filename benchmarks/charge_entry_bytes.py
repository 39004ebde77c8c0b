"""Train the app with the store's sizing *charging* a different entry layout (a what-if).

``store.sizing.entry_bytes`` decides how many hash-table entries and chunk slots a budget buys.
This runs ``torchrec_fiited.train`` with it replaced by ``key + score + K x (slot index +
utility)`` bytes from ``CHARGE_ENTRY=key,score,utility`` (the slot index keeps the pool's own
width), while the tensors stay as they are: a run then holds more real bytes than its budget,
and its AUC is an upper bound on what entries of that size could buy. README, "Equal-bytes
sweep", session 12's table of charged entry sizes, came from (seeds 0-2, budgets 0.01, 0.001,
the pruning interval then a tenth of an epoch)::

    CHARGE_ENTRY=4,0,2 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/charge_entry_bytes.py \\
        emb=fiited budget=0.001 seed=0 emb.prune_interval_fraction=0.1 \\
        hydra.run.dir=outputs/charged/fiited_0.001_0
    CHARGE_ENTRY=4,0,2 ... emb=adaembed ...

Without ``CHARGE_ENTRY`` it is ``python -m torchrec_fiited.train``.
"""

import os

import torchrec_fiited.store.sizing as sizing


def _charged(spec: str):
    key, score, utility = (int(x) for x in spec.split(","))

    def entry_bytes(num_chunks: int, slots=None) -> int:
        return key + score + (sizing._index_bytes(slots) + utility) * num_chunks

    return entry_bytes


if __name__ == "__main__":
    if os.environ.get("CHARGE_ENTRY"):
        sizing.entry_bytes = _charged(os.environ["CHARGE_ENTRY"])
    from torchrec_fiited.train import main

    main()
