"""Serving: export a trained FIITED model, quantize its pools, save and load it.

``export_for_inference(model, dtype)`` turns every ``FiitedEmbeddingBagCollection`` in ``model``
into a compacted, read-only ``FiitedInferenceEBC`` (per pool a compact key probe, the served keys'
chunk addresses and the live chunks; nothing sized by ``num_embeddings``); ``save_inference`` /
``load_inference`` write and read it (or a DLRM over it) without any training state. The served
modules script
(``torch.jit.script``), FX-trace (``torchrec.fx.symbolic_trace``) and export: ``export_program``
gives a ``torch.export`` program with dynamic batch and id counts that a server loads with only
``import torchrec, torchrec_fiited.ops.native``.
"""

from torchrec_fiited.inference.export import (
    FiitedInferenceEBC,
    InferencePool,
    InferenceSpec,
    InferenceTable,
    export_for_inference,
    export_program,
    kjt_dynamic_shapes,
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
    "export_program",
    "kjt_dynamic_shapes",
    "load_inference",
    "save_inference",
]
