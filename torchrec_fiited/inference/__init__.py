"""Serving: export a trained FIITED model, quantize its pools, save and load it.

``export_for_inference(model, dtype)`` turns every ``FiitedEmbeddingBagCollection`` in ``model``
into a compacted, read-only ``FiitedInferenceEBC``; ``save_inference`` / ``load_inference`` write
and read it (or a DLRM over it) without any training state.
"""

from torchrec_fiited.inference.export import (
    FiitedInferenceEBC,
    InferencePool,
    InferenceSpec,
    InferenceTable,
    export_for_inference,
    load_inference,
    save_inference,
)
from torchrec_fiited.inference.quantize import DTYPES

__all__ = [
    "DTYPES",
    "FiitedInferenceEBC",
    "InferencePool",
    "InferenceSpec",
    "InferenceTable",
    "export_for_inference",
    "load_inference",
    "save_inference",
]
