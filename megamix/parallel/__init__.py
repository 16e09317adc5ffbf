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
    mark_sequence_parallel,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "NO_TENSOR_PARALLEL", "SINGLE", "ColumnParallelLinear", "CommRecorder", "DistributedOptimizer", "Group",
    "ParallelState", "Piece", "RowParallelLinear", "Sharding", "TensorParallel", "VocabParallelEmbedding",
    "check_layout", "init_distributed", "mark_sequence_parallel", "column_parallel_linear", "record_communication",
    "set_sharding", "sharding_of", "vocab_parallel_cross_entropy",
]
