"""DLRM (torchrec.models.dlrm) over a chosen embedding module, sized by one budget knob."""

from typing import Dict, List, Sequence

import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad

from torchrec_fiited import FiitedConfig, FiitedEmbeddingBagCollection


def make_tables(
    sparse_names: Sequence[str], num_embeddings: Sequence[int], dim: int
) -> List[EmbeddingBagConfig]:
    """One table per sparse feature, ``num_embeddings[f]`` rows of ``dim``."""
    return [
        EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=int(n),
                           feature_names=[name])
        for name, n in zip(sparse_names, num_embeddings)
    ]


def full_embeddings(tables: List[EmbeddingBagConfig], lr: float, eps: float) -> FusedEmbeddingBagCollection:
    """The unpruned baseline: TorchRec's EBC with FBGEMM's fused rowwise Adagrad (what FIITED's
    fused rowwise Adagrad is compared with, update for update)."""
    return FusedEmbeddingBagCollection(
        tables, optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": lr, "eps": eps}
    )


def fiited_embeddings(tables: List[EmbeddingBagConfig], config: FiitedConfig) -> FiitedEmbeddingBagCollection:
    return FiitedEmbeddingBagCollection(tables, config)


def build_dlrm(
    embeddings: EmbeddingBagCollectionInterface,
    num_dense: int,
    dense_arch: Sequence[int],
    over_arch: Sequence[int],
) -> DLRM:
    """DLRM with dot interaction; ``dense_arch`` must end at the embedding dim."""
    dims = {t.embedding_dim for t in embeddings.embedding_bag_configs()}
    if len(dims) != 1 or list(dims)[0] != dense_arch[-1]:
        raise ValueError(
            f"DLRM needs every embedding dim equal to dense_arch[-1]={dense_arch[-1]}, got {sorted(dims)}"
        )
    return DLRM(
        embedding_bag_collection=embeddings,
        dense_in_features=num_dense,
        dense_arch_layer_sizes=list(dense_arch),
        over_arch_layer_sizes=list(over_arch),
    )


def dense_named_parameters(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Parameters the dense optimizer owns, by name: everything but the embedding weights that a
    fused optimizer updates in backward (unsharded fused modules, or any parameter torchrec marks
    with ``_in_backward_optimizers`` once sharded)."""
    fused = set()
    for module in model.modules():
        if isinstance(module, (FusedEmbeddingBagCollection, FiitedEmbeddingBagCollection)):
            fused |= {id(p) for p in module.parameters()}
    return {n: p for n, p in model.named_parameters()
            if id(p) not in fused and not hasattr(p, "_in_backward_optimizers")}


def dense_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Parameters the dense optimizer owns: everything but fused embedding weights."""
    return list(dense_named_parameters(model).values())
