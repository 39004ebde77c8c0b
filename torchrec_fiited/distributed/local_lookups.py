"""A rank's lookups in a sharded FIITED collection, and how they read the local KJT.

torchrec's input dist hands each rank one KJT per sharding type, features laid out by the
sharding's grouped configs (a rank holding two column shards of a table sees its features twice).
Each lookup is a ``FiitedEmbeddingBagCollection`` over shards with the same chunk count (a store
holds one K); a ``Part`` says which of the KJT's features it reads and where its columns go.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingSharding
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_fiited.config import FiitedConfig
from torchrec_fiited.modules.fiited_ebc import FiitedEmbeddingBagCollection
from torchrec_fiited.modules.layout_plan import TableShard
from torchrec_fiited.policy import PruneCoordinator
from torchrec_fiited.ops import dispatch


@dataclass(frozen=True)
class Part:
    """One lookup's share of a sharding's local KJT.

    Args:
        index: the lookup's index in ``_lookups``.
        keys: its (renamed) features, in order.
        positions: where those features sit among the local KJT's keys.
        dims: the output columns of each feature.
        num_keys: features in the local KJT.
        row_blocks: per feature of a row-wise shard, (start of its hash range, rows of its
            table): its local ids are permuted rows less the start, mapped back to the ids
            (``store.row_permutation``); None for a lookup without row-wise shards.
    """

    index: int
    keys: List[str]
    positions: List[int]
    dims: List[int]
    num_keys: int
    row_blocks: Optional[List[Tuple[int, int]]] = None


def column_order(parts: List[Part]) -> Optional[torch.Tensor]:
    """Columns of the parts' concatenated outputs in local-KJT feature order (None: one part)."""
    if len(parts) == 1:
        return None
    start, at = {}, 0
    for part in parts:
        for pos, dim in zip(part.positions, part.dims):
            start[pos] = (at, dim)
            at += dim
    return torch.cat([torch.arange(a, a + d) for a, d in (start[p] for p in sorted(start))])


def build_local_lookups(
    sharding,
    tables: List[EmbeddingBagConfig],
    config: FiitedConfig,
    device: torch.device,
    is_weighted: bool,
    split_mean_tables: Set[str],
    coordinator: PruneCoordinator,
    first_index: int,
) -> List[Tuple[FiitedEmbeddingBagCollection, Part]]:
    """This rank's lookups for one torchrec sharding (one per chunk count of its shards; one
    empty lookup when it holds no shard), each with where its features sit in the local KJT.

    Args:
        sharding: a Tw/Rw/CwPooledEmbeddingSharding; its ``_grouped_embedding_configs`` are
            this rank's shards, in the order the input dist lays out the local KJT.
        tables: the collection's (global) tables.
        split_mean_tables: MEAN tables whose bags are split over ranks: pooled as SUM here.
        first_index: index of the first returned lookup in the module's list.
    """
    by_name = {t.name: t for t in tables}
    by_chunks: Dict[int, Tuple[list, dict, List[str], List[int], List[int], list]] = {}
    position = 0
    row_wise = isinstance(sharding, RwPooledEmbeddingSharding)
    for group in sharding._grouped_embedding_configs:
        for st in group.embedding_tables:
            g = by_name[st.name]
            row_off, col_off = (st.local_metadata.shard_offsets if st.local_metadata else (0, 0))
            column_shard = st.local_cols != g.embedding_dim
            name = f"{st.name}@c{col_off}" if column_shard else st.name
            feats = [f"{f}@c{col_off}" if column_shard else f for f in st.feature_names]
            split_bags = g.pooling == PoolingType.MEAN and g.name in split_mean_tables
            num_chunks = st.local_cols * config.num_chunks // g.embedding_dim
            local_tables, shards, keys, positions, dims, blocks = by_chunks.setdefault(
                num_chunks, ([], {}, [], [], [], [])
            )
            # A row shard holds a block of permuted rows (a hash range of the ids) and keys
            # them by the ids themselves: its id space is the global table's.
            local_tables.append(
                EmbeddingBagConfig(
                    num_embeddings=g.num_embeddings if row_wise else st.local_rows,
                    embedding_dim=st.local_cols, name=name,
                    feature_names=feats, pooling=PoolingType.SUM if split_bags else g.pooling,
                    weight_init_min=g.get_weight_init_min(), weight_init_max=g.get_weight_init_max(),
                )
            )
            if row_wise:
                block = (int(row_off), int(row_off) + st.local_rows)
                shards[name] = TableShard(st.name, 0, int(col_off), block)
                blocks += [(int(row_off), g.num_embeddings)] * len(feats)
            else:
                shards[name] = TableShard(st.name, int(row_off), int(col_off))
            keys += feats
            positions += range(position, position + len(feats))
            dims += [st.local_cols] * len(feats)
            position += len(feats)
    if not by_chunks:
        by_chunks[config.num_chunks] = ([], {}, [], [], [], [])
    out = []
    for local_tables, shards, keys, positions, dims, blocks in by_chunks.values():
        lookup = FiitedEmbeddingBagCollection(
            local_tables, config, device, is_weighted, shards, tables, coordinator
        )
        part = Part(first_index + len(out), keys, positions, dims, position, blocks or None)
        out.append((lookup, part))
    return out


def to_hash_ranges(kjt: KeyedJaggedTensor, num_rows: Dict[str, int]) -> KeyedJaggedTensor:
    """The KJT with each id of a feature in ``num_rows`` (feature -> rows of its table)
    replaced by its permuted row (``store.row_permutation``), so torchrec's row-wise
    bucketization by blocks sends every rank the ids of its hash range. Ids must be in range."""
    if not num_rows:
        return kjt
    keys = kjt.keys()
    per_key = kjt.length_per_key()
    starts = [0]
    for c in per_key:
        starts.append(starts[-1] + c)
    routed = [k in num_rows for k in keys]  # the others (table-/column-wise) keep their ids
    values = kjt.values().to(torch.int64)
    if all(routed):
        values = dispatch.row_permutation(values, starts, [num_rows[k] for k in keys],
                                          [0] * len(keys), inverse=False)
    else:
        parts = list(torch.split(values, per_key))
        for i, key in enumerate(keys):
            if routed[i]:
                parts[i] = dispatch.row_permutation(parts[i], [0, per_key[i]], [num_rows[key]],
                                                    [0], inverse=False)
        values = torch.cat(parts) if parts else values
    return KeyedJaggedTensor(
        keys, values, kjt.weights_or_none(), lengths=kjt.lengths(), stride=kjt.stride()
    )


def _from_hash_ranges(values: torch.Tensor, per_key: List[int], blocks: List[Tuple[int, int]]):
    """Local ids of row-wise features (permuted rows less their range's start) -> the ids."""
    starts = [0]
    for c in per_key:
        starts.append(starts[-1] + c)
    return dispatch.row_permutation(values, starts, [n for _, n in blocks],
                                    [start for start, _ in blocks], inverse=True)


def resolve(lookup: FiitedEmbeddingBagCollection, part: "Part", kjt: KeyedJaggedTensor):
    """The lookup's resolved batch from the local KJT, and the KJT's batch size."""
    if not part.keys:
        return [], kjt.stride()
    if len(kjt.keys()) != part.num_keys:
        raise RuntimeError(
            f"[torchrec_fiited] local KJT keys {kjt.keys()} do not match {part.num_keys} features"
        )
    if len(part.positions) != part.num_keys:
        kjt = kjt.permute(part.positions)
    # Column shards of one table on one rank arrive as repeated keys; rename them to the
    # lookup's per-shard features (same order: both follow the grouped configs).
    values = kjt.values()
    if part.row_blocks is not None:
        values = _from_hash_ranges(values, kjt.length_per_key(), part.row_blocks)
    local = KeyedJaggedTensor(
        part.keys, values, kjt.weights_or_none(), lengths=kjt.lengths(), stride=kjt.stride()
    )
    # From the lookup's step buffers: the collection releases the batch after its backward (an
    # inference forward: after pooling), so the next step's per-id tensors reuse its memory.
    return lookup._resolve(local, reuse=True), kjt.stride()
