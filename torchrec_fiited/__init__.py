"""torchrec_fiited: FIITED in-training embedding chunk pruning for TorchRec.

Public surface: ``FiitedConfig`` (with ``DimPruningConfig`` for FIITED-2D), ``FiitedEmbeddingBagCollection``, and for serving
``export_for_inference`` / ``save_inference`` / ``load_inference``.
"""

from torchrec_fiited.config import DimPruningConfig, FiitedConfig
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection
from torchrec_fiited.inference import export_for_inference, load_inference, save_inference  # noqa: E402 (needs modules)

__all__ = [
    "DimPruningConfig",
    "FiitedConfig",
    "FiitedEmbeddingBagCollection",
    "export_for_inference",
    "load_inference",
    "save_inference",
]
