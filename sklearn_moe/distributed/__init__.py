"""Training on ``torch.distributed``: expert parallelism (:mod:`.expert_parallel`)."""

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
    "ExpertParallelMoE",
    "ShardedExperts",
    "expert_shards",
    "gather_experts",
    "reduce_gradients",
    "shard_experts",
]
