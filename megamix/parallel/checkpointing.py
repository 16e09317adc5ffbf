"""Sharded tensors for ``torch.distributed.checkpoint``: each rank writes and reads its pieces at global offsets.

DCP natively understands one shard per rank (DTensor). A tensor-parallel weight
with several logical parts ([q | k | v]), replicated kv heads, or an optimizer's
row slice of it gives a rank several rectangular pieces of the global tensor;
:class:`GlobalPieces` describes them through DCP's checkpointable-object hooks,
and the two planners let DCP find them. Pieces held by several ranks are
written once (DCP deduplicates identical indices). Loading asks each piece's
global region back, whatever layout wrote it: that is the resharding.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megamix.parallel.sharding import Sharding


class GlobalPieces:
    """Views of one rank's pieces of a global tensor of shape ``global_shape``, keyed by global offsets."""

    def __init__(self, sharding: Sharding, tensor: torch.Tensor, row_start: int = 0):
        self.global_shape = torch.Size(sharding.global_shape)
        self.pieces = dict(sharding.chunks(tensor, row_start))
        self.dtype = tensor.dtype

    def size(self) -> torch.Size:
        return self.global_shape

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(offsets), view.shape) for offsets, view in self.pieces.items()]

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), view.shape),
                                                      properties=TensorProperties.create_from_tensor(view),
                                                      size=self.global_shape))
                for offsets, view in self.pieces.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.pieces[tuple(index.offset)]


class PiecesSavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, GlobalPieces) else super().lookup_object(index)


class PiecesLoadPlanner(DefaultLoadPlanner):
    """Loads a flat state dict (``{"model.layers.0.norm.weight": ...}``) with :class:`GlobalPieces` values."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # The default set-up replaces every value type it does not know by None: put the pieces back.
        pieces = {key: value for key, value in state_dict.items() if isinstance(value, GlobalPieces)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(pieces)
        self.state_dict.update(pieces)
        self.mappings.update({key: (key,) for key in pieces})

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, GlobalPieces) else super().lookup_tensor(index)
