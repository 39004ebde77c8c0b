"""torchrec_fiited: FIITED in-training embedding chunk pruning for TorchRec.

Public surface: ``FiitedConfig`` (with ``DimPruningConfig`` for FIITED-2D), ``FiitedEmbeddingBagCollection``; for
DistributedModelParallel ``FiitedEmbeddingBagCollectionSharder``, ``fiited_sharders`` and ``make_fiited_planner``; and for
serving ``export_for_inference`` / ``save_inference`` / ``load_inference`` / ``export_program``.

The names are imported on first use, so ``import torchrec_fiited.ops.native`` (which registers
``torch.ops.fiited.*``) loads neither torchrec nor the training code: that import is all a server
needs before ``torch.export.load`` of an exported FIITED model (plus ``import torchrec`` for the
KJT input).
"""

import importlib
from typing import Any

_EXPORTS = {
    "DimPruningConfig": "torchrec_fiited.config",
    "FiitedConfig": "torchrec_fiited.config",
    "FiitedEmbeddingBagCollection": "torchrec_fiited.modules.fiited_ebc",
    "FiitedEmbeddingBagCollectionSharder": "torchrec_fiited.distributed",
    "fiited_sharders": "torchrec_fiited.distributed",
    "make_fiited_planner": "torchrec_fiited.distributed",
    "export_for_inference": "torchrec_fiited.inference",
    "export_program": "torchrec_fiited.inference",
    "load_inference": "torchrec_fiited.inference",
    "save_inference": "torchrec_fiited.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torchrec_fiited' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
