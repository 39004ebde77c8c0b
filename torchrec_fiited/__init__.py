"""torchrec_fiited: FIITED in-training embedding chunk pruning for TorchRec.

Public surface: ``FiitedConfig`` and ``FiitedEmbeddingBagCollection``.
"""

from torchrec_fiited.config import FiitedConfig
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection

__all__ = ["FiitedConfig", "FiitedEmbeddingBagCollection"]
