"""Sharded validation in data-parallel fits (:mod:`sklearn_moe.distributed.validation`),
without processes: the batching, the sharding decision and the merges. The two-process
fits are in ``test_distributed_data_parallel.py``."""

import numpy as np
import pytest
import torch

from sklearn_moe._data import BatchIterator, TensorTable
from sklearn_moe.callbacks import _RoutingTally
from sklearn_moe.distributed import validation
from sklearn_moe.distributed.callbacks import merge_history_rows
from sklearn_moe.distributed.data_parallel import DataParallelGroup
from sklearn_moe.distributed.validation import ValidationShard, shard_validation


def table(n):
    return TensorTable(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def test_a_pass_in_a_given_number_of_batches_covers_every_row_in_order_in_even_batches():
    batches = list(BatchIterator(table(10), batch_size=64, n_batches=3))
    assert [len(y) for _, y in batches] == [4, 3, 3]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    assert [len(y) for _, y in BatchIterator(table(6), batch_size=64, n_batches=6)] == [1] * 6
    with pytest.raises(ValueError, match="n_batches=7 needs shuffle=False and at most one batch per row"):
        BatchIterator(table(6), 64, n_batches=7)
    with pytest.raises(ValueError, match="n_batches=2 needs shuffle=False"):
        BatchIterator(table(6), 64, shuffle=True, n_batches=2)


@pytest.fixture
def process(monkeypatch):
    """Make this process rank ``rank`` of ``world_size`` for shard_validation."""
    def become(rank, world_size):
        monkeypatch.setattr(validation, "active_group", lambda: DataParallelGroup(None, rank, world_size))
    return become


def test_each_process_takes_every_world_size_th_validation_row_in_as_many_batches(process):
    whole = table(10)
    process(1, 3)
    shard = shard_validation(whole, batch_size=2)
    assert isinstance(shard, ValidationShard) and shard.y.tolist() == [1, 4, 7]
    # rank 0 has 4 rows: 2 batches of at most 2 rows on every process
    assert shard.n_rows == 10 and shard.n_batches == 2
    assert [len(y) for _, y in BatchIterator(shard, 2, n_batches=shard.n_batches)] == [2, 1]
    process(0, 3)
    assert shard_validation(whole, batch_size=2).y.tolist() == [0, 3, 6, 9]
    # the whole set: with the user's callbacks, without validation, on one process, or when
    # a process has fewer rows than the batches (3 processes of 2, 2 and 1 rows, batches of 1)
    assert shard_validation(whole, batch_size=2, whole=True) is whole
    assert shard_validation(None, batch_size=2) is None
    small = table(5)
    assert shard_validation(small, batch_size=1) is small
    process(0, 1)
    assert shard_validation(whole, batch_size=2) is whole


def test_without_a_data_parallel_block_the_validation_set_is_whole():
    whole = table(10)
    assert shard_validation(whole, batch_size=2) is whole


def test_sharded_validation_losses_merge_as_a_mean_over_every_row():
    rows = [dict(train_loss=1.0, valid_loss=1.0, valid_loss_best=True,
                 batches=[{"train_batch_size": 8}, {"valid_batch_size": 20}, {"valid_batch_size": 10}]),
            dict(train_loss=1.0, valid_loss=4.0, valid_loss_best=False, batches=[{"valid_batch_size": 10}])]
    merged = merge_history_rows(rows, earlier=[dict(valid_loss=1.5)], sharded_validation=True)
    assert merged["valid_loss"] == pytest.approx((1.0 * 30 + 4.0 * 10) / 40)
    assert merged["valid_loss_best"] is False  # 1.75 is not below the earlier 1.5
    assert merge_history_rows(rows, earlier=[dict(valid_loss=2.0)], sharded_validation=True)["valid_loss_best"]
    # every process evaluated the whole set: rank 0's
    assert merge_history_rows(rows, earlier=[])["valid_loss"] == 1.0


def test_a_routing_tally_sums_every_count_over_the_processes():
    tally = _RoutingTally()
    gates = torch.tensor([[0.75, 0.25, 0.0], [0.0, 1.0, 0.0]])
    tally.add(torch.tensor([1, 2, 0]), gates, torch.tensor(1))
    # two processes with this tally each
    merged = tally.summed(lambda sums: 2 * sums)
    assert merged.counts.tolist() == [2, 4, 0] and merged.counts.dtype == torch.int64
    assert merged.rows == 4 and int(merged.dropped) == 2
    torch.testing.assert_close(merged.gate_mass, 2 * gates.sum(0).double())
    metrics, alone = merged.metrics(), tally.metrics()
    for key in ("routing_entropy", "load_cv", "dropped_fraction"):
        assert metrics[key] == pytest.approx(alone[key])
    np.testing.assert_allclose(metrics["gate_share"], alone["gate_share"])
