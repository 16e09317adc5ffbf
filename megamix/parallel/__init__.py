"""The parallel layer library: process groups, collectives, TP/SP layers, sharding rules, ZeRO-1.

Layers use these building blocks as drop-ins; groups, collectives and sharding
rules live only here (DESIGN.md §3).
"""

from megamix.parallel.comm import CommRecorder, record_communication
from megamix.parallel.optimizer import DistributedOptimizer
from megamix.parallel.sharding import Piece, Sharding, set_sharding, sharding_of
from megamix.parallel.state import (
    NO_TENSOR_PARALLEL,
    SINGLE,
    Group,
    ParallelState,
    TensorParallel,
    check_layout,
    init_distributed,
)
from megamix.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    mark_replicated_partial_grads,
    mark_sequence_parallel,
    mark_split_rows,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "NO_TENSOR_PARALLEL", "SINGLE", "ColumnParallelLinear", "CommRecorder", "DistributedOptimizer", "Group",
    "ParallelState", "Piece", "RowParallelLinear", "Sharding", "TensorParallel", "VocabParallelEmbedding",
    "check_layout", "column_parallel_linear", "init_distributed", "mark_replicated_partial_grads",
    "mark_sequence_parallel", "mark_split_rows", "record_communication", "set_sharding", "sharding_of",
    "vocab_parallel_cross_entropy",
]
