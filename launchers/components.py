"""torchx components of torchrec_fiited: the Hydra training app on N nodes x M processes.

The component only builds the ``AppDef`` (torchrun around ``python -m torchrec_fiited.train``);
every training knob is a Hydra override passed after ``--``::

    torchx run -s local_cwd launchers/components.py:train --nproc_per_node 2 -- \\
        emb=full train.steps=100 hydra.run.dir=outputs/torchx_run

The same component runs on slurm and kubernetes (see launchers/README.md).
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

#: The module torchrun runs on every process.
TRAIN_MODULE = "torchrec_fiited.train"


def train(
    *script_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = "torchrec_fiited:latest",
    name: str = "/torchrec_fiited",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train a DLRM with torchrec_fiited on ``nnodes`` x ``nproc_per_node`` processes.

    Tables are sharded with torchrec's DistributedModelParallel (gloo on CPU, NCCL on GPUs);
    rank 0 writes metrics.json into ``hydra.run.dir``. Pass ``train.resume=true`` with
    ``train.checkpoint_every`` and ``max_retries`` so a restarted job continues from its last
    checkpoint.

    Args:
        script_args: Hydra overrides for torchrec_fiited.train, e.g. ``emb=fiited budget=0.1``.
        nnodes: number of hosts.
        nproc_per_node: processes per host (at most the GPUs of a host when gpu > 0).
        image: container image (docker, kubernetes); local_cwd runs in the current directory
            and slurm in the job's working directory instead.
        name: job name, ``{experiment}/{run}``.
        cpu: CPUs per host.
        gpu: GPUs per host.
        memMB: memory per host in MB.
        h: a registered named resource (overrides cpu, gpu and memMB).
        env: extra environment variables, e.g. ``NCCL_DEBUG=INFO``.
        max_retries: scheduler restarts of a failed job.
        rdzv_port: port of the c10d rendezvous on the first host (multi-node only).
        mounts: volumes, e.g. ``type=bind,src=/data,dst=/data`` (shared checkpoint storage).
    """
    return dist.ddp(
        *script_args,
        m=TRAIN_MODULE,
        j=f"{nnodes}x{nproc_per_node}",
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        h=h,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
