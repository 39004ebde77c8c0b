"""Atomic, resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under the checkpoint root::

    step_000000040/        complete: every rank's DCP shards, DCP's .metadata, and meta.json
    step_000000050.tmp/    being written; never read

A save writes ``step_<N>.tmp`` (each rank its own shards of the ShardedTensors, replicated
tensors once), waits for every rank, and rank 0 writes meta.json and renames the directory to
``step_<N>``. The rename is atomic, so a directory without ``.tmp`` is always complete. Older
checkpoints are deleted only after that, so a fault at any moment leaves the previous complete
checkpoint. Every rank must see the same root (a shared filesystem on more than one node).

DCP loads in place: the caller passes a state dict shaped like the one it saved (the live
model's ``state_dict()``), then hands the filled values to ``load_state_dict``.
"""

import contextlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner, create_default_local_load_plan,
)

from torchrec_fiited.app.parallel import DistEnv, barrier, broadcast_from_main

log = logging.getLogger(__name__)

META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class Checkpointer:
    """Saves and finds the checkpoints of one run under ``root``.

    Args:
        root: directory holding the ``step_<N>`` checkpoints (created on first save).
        env: the run's ranks; every rank calls ``save`` and ``load`` together.
    """

    def __init__(self, root: str, env: DistEnv) -> None:
        self.root = root
        self.env = env

    def complete(self) -> List[Tuple[int, str]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            match = _STEP_DIR.match(name)
            path = os.path.join(self.root, name)
            if match and os.path.isfile(os.path.join(path, META)):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint, as rank 0 sees it (so every rank loads the same)."""
        found = self.complete() if self.env.is_main else None
        return broadcast_from_main(self.env, found[-1][1] if found else None)

    def save(self, step: int, state: Dict[str, Any], meta: Dict[str, Any]) -> str:
        """Write ``state`` as the checkpoint of ``step``; returns its directory."""
        final = os.path.join(self.root, f"step_{step:09d}")
        tmp = final + ".tmp"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
            os.makedirs(tmp)
        barrier(self.env)
        with _single_process_is_intended():
            dcp.save(state, checkpoint_id=tmp, no_dist=not self.env.is_distributed)
        barrier(self.env)  # every rank's shards are on disk
        if self.env.is_main:
            _write_json(os.path.join(tmp, META), {**meta, "step": step})
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            for old_step, old in self.complete():
                if old_step < step:
                    shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s", final)
        barrier(self.env)
        return final

    def metadata(self, path: str) -> Dict[str, Any]:
        """DCP's per-key metadata of a checkpoint (sizes of the saved tensors)."""
        return dict(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)

    def load(self, path: str, state: Dict[str, Any]) -> None:
        """Fill ``state`` in place from the checkpoint at ``path``."""
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path, planner=_LoadPlanner(),
                     no_dist=not self.env.is_distributed)


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns that it "assumes" a single process even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner without its guess at torch <= 2.3 key formats.

    The guess fires whenever the checkpoint has keys this rank lacks, which is always so here
    (another rank's table-wise optimizer state, the ``rank_<r>`` entries), and then turns every
    dict without tensors (the trainer counters, FIITED's config) into one key that a checkpoint
    written by torch >= 2.4 does not have. Missing keys of this rank's own state still raise.
    """

    def create_local_plan(self):
        return create_default_local_load_plan(self.state_dict, self.metadata,
                                              not self.allow_partial_load)


def read_meta(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def check_compatible(path: str, meta: Dict[str, Any], run: Dict[str, Any]) -> None:
    """Raise unless the checkpoint was made by a run like this one (same ``run`` keys).

    Raises:
        ValueError: listing every differing key as "checkpoint vs this run".
    """
    diffs = [f"{k}: {meta.get(k)!r} vs {v!r}" for k, v in run.items() if meta.get(k) != v]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: it was made by another setup (checkpoint vs this run): "
            + ", ".join(diffs) + "; resume with the same settings or start in a new directory"
        )


def rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's random generators (torch, CUDA when used, numpy, python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_json(path: str, obj: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
