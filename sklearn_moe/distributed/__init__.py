"""Training on ``torch.distributed``: data parallelism (:mod:`.data_parallel`, started by
``torchrun -m sklearn_moe.distributed.fit``) and expert parallelism (:mod:`.expert_parallel`)."""

from .callbacks import EpochAgreement, GradientAveraging, ShardedGradientClipping
from .data_parallel import DataParallelGroup, data_parallel
from .expert_parallel import (
    CommStats,
    ExpertParallelMoE,
    ShardedExperts,
    expert_shards,
    gather_experts,
    reduce_gradients,
    shard_experts,
)

__all__ = [
    "CommStats",
    "DataParallelGroup",
    "EpochAgreement",
    "ExpertParallelMoE",
    "GradientAveraging",
    "ShardedExperts",
    "ShardedGradientClipping",
    "data_parallel",
    "expert_shards",
    "gather_experts",
    "reduce_gradients",
    "shard_experts",
]
