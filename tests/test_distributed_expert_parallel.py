"""Expert parallelism (sklearn_moe.distributed) against the single-process module.

Two gloo processes on loopback (torch.multiprocessing.spawn, a free port chosen at run time)
run every scenario once; each writes what it measured to a file in tmp_path, and the tests
here compare. Every rank builds the same single-process module (same seed) and knows every
rank's batch, so it computes the single-process reference itself.

Gradients compared: an expert's gradient on its owner rank against the slice of the
single-process gradient; a replicated parameter's gradient after ``reduce_gradients`` with
``"sum"`` (the sum of the ranks' local gradients) against the single-process gradient of
the sum of the ranks' losses, which for dropless routing is the loss over the concatenation
of the ranks' batches. With ``"mean"`` both are divided by the number of ranks.
"""

from __future__ import annotations

import copy
import socket
import traceback

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from sklearn_moe.distributed import (  # noqa: E402
    CommStats,
    ExpertParallelMoE,
    expert_shards,
    gather_experts,
    reduce_gradients,
    shard_experts,
)
from sklearn_moe.nn import MixtureOfExperts  # noqa: E402

WORLD_SIZE = 2
RTOL, ATOL = 1e-5, 1e-6
N_FEATURES, N_OUTPUTS = 3, 2
FIELDS = ("output", "gates", "balance_loss", "z_loss", "expert_counts", "n_dropped", "diversity_loss")



def _scenario(module, biases, sizes, train=True, reduction="sum", reference="concat", autocast=False,
              tolerance=(RTOL, ATOL)):
    """``module``: the module's arguments; ``biases``: the router's gate biases (None: as
    drawn); ``sizes``: each rank's rows; ``reduction``: of ``reduce_gradients``;
    ``reference``: the single-process loss whose gradients are expected, over the
    concatenated batches (``"concat"``) or summed over the ranks' batches run one by one
    (``"per_batch"``: capacity caps each batch); ``autocast``: run under bf16 autocast."""
    return dict(module=module, biases=biases, sizes=sizes, train=train, reduction=reduction, reference=reference,
                autocast=autocast, tolerance=tolerance)


SCENARIOS = {
    # 5 experts over 2 ranks (3 + 2); expert 4 gets no row, expert 0 most.
    "top1_uneven": _scenario(dict(n_experts=5, top_k=1, expert_hidden=(8,)), [1.0, 0.0, 0.5, 0.0, -100.0], (7, 5)),
    # embedded input (so the rows' gradients travel back too), two residual hidden layers
    # with layer norm, a shared expert; expert 3 gets no row.
    "top2_embedded": _scenario(dict(n_experts=4, top_k=2, expert_hidden=(8, 8), layer_norm=True, shared_expert=True,
                                    numeric_embedding="periodic", embedding_columns=[0, 1]),
                               [0.5, 0.0, 0.0, -100.0], (6, 9), reduction="mean"),
    # rank 1's experts get no row at all, and rank 1 has no row of its own.
    "idle_rank": _scenario(dict(n_experts=4, top_k=1, expert_hidden=(8,)), [0.0, 0.5, -100.0, -100.0], (6, 0)),
    # under bf16 autocast: outputs travel in bf16, also from rank 1, whose experts get no row.
    "idle_experts_bf16": _scenario(dict(n_experts=4, top_k=1, expert_hidden=(8,)), [0.0, 0.5, -100.0, -100.0],
                                   (6, 3), autocast=True, tolerance=(2e-2, 2e-2)),
    # embedded input (the rows need gradients) and rank 1's experts get no row: rank 1 must
    # still join the backward exchange of the rows.
    "idle_experts_embedded": _scenario(dict(n_experts=4, top_k=1, expert_hidden=(8,), numeric_embedding="periodic",
                                            embedding_columns=[0, 1]), [0.0, 0.5, -100.0, -100.0], (6, 3)),
    # capacity in training: applied to each rank's batch, rows past it rerouted.
    "capacity": _scenario(dict(n_experts=4, top_k=2, expert_hidden=(8,), capacity_factor=1.0,
                               capacity_overflow="reroute"), [2.0, 1.0, 0.0, 0.0], (10, 7), reference="per_batch"),
    # a dense router, with the diversity loss (every expert on every row).
    "dense": _scenario(dict(n_experts=3, top_k=3, router="softmax", expert_hidden=(8,), diversity_loss=True,
                            diversity_rows=4), None, (5, 4)),
    # a dense router on a rank with no row: its empty slice of every expert's output
    # (a mixture density's, with a shared expert) still joins both exchanges.
    "dense_idle_rank": _scenario(dict(n_experts=4, top_k=4, router="softmax", expert_hidden=(), shared_expert=True,
                                      output="mixture_density"), None, (0, 5)),
    # evaluation, a few rows: the single-process module runs every expert on every row.
    "eval_small": _scenario(dict(n_experts=4, top_k=2, expert_hidden=(8,)), None, (3, 4), train=False),
    # evaluation, rank 1's experts get no row (a validation batch in a data-parallel fit)
    "eval_idle_experts": _scenario(dict(n_experts=4, top_k=1, expert_hidden=(8, 8)), [0.0, 0.5, -100.0, -100.0],
                                   (9, 7), train=False),
    # evaluation of a mixture density, with predict_distribution (every expert on every row).
    "eval_density": _scenario(dict(n_experts=4, top_k=2, expert_hidden=(8,), output="mixture_density"), None,
                              (9, 6), train=False),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module(arguments, biases, seed=0):
    torch.manual_seed(seed)
    module = MixtureOfExperts(N_FEATURES, N_OUTPUTS, **arguments)
    if biases is not None:
        with torch.no_grad():
            module.router.gate.bias.copy_(torch.tensor(biases))
    return module


def _loss(out, a, b):
    """A loss that sums over rows, through the output and the per-expert outputs."""
    assignments = out.assignments
    return (out.output * a).sum() + (assignments.outputs * b.index_select(0, assignments.rows)).sum()


def _grads(module, names):
    params = dict(module.named_parameters())
    return {name: (params[name].grad if params[name].grad is not None else torch.zeros_like(params[name])).clone()
            for name in names}


def _run_scenario(name, rank):
    scenario = SCENARIOS[name]
    sizes, train, reduction = scenario["sizes"], scenario["train"], scenario["reduction"]
    generator = torch.Generator().manual_seed(1)
    x_all = torch.randn(sum(sizes), N_FEATURES, generator=generator)
    batches = list(torch.split(x_all, list(sizes)))
    single = _module(scenario["module"], scenario["biases"])
    a_all = torch.randn(sum(sizes), N_OUTPUTS, generator=generator)
    b_all = torch.randn(sum(sizes), single.expert_width, generator=generator)
    a_parts, b_parts = torch.split(a_all, list(sizes)), torch.split(b_all, list(sizes))
    parallel = ExpertParallelMoE.from_module(single)
    parallel.train(train)
    single.train(train)
    result = {"pairs": {}, "range": parallel.expert_range}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=scenario["autocast"])

    parallel.comm_stats.reset()
    # evaluation without autograd, as a validation pass runs (its products take other paths)
    with autocast, torch.set_grad_enabled(train):
        out = parallel(batches[rank])
        local = single(batches[rank])  # the single-process module on this rank's batch
    for field in FIELDS:
        result["pairs"][f"{field}"] = (getattr(out, field).detach(), getattr(local, field).detach())
    for field in ("rows", "experts", "weights", "outputs"):
        result["pairs"][f"assignments.{field}"] = (getattr(out.assignments, field).detach(),
                                                   getattr(local.assignments, field).detach())
    result["experts_routed"] = out.assignments.experts.tolist()
    result["in_features"], result["out_features"] = parallel.experts.in_features, parallel.experts.out_features
    if not train:
        result["pairs"]["predict"] = (parallel.predict(batches[rank]), single.predict(batches[rank]))
        result["pairs"]["route"] = (parallel.route(batches[rank]), single.route(batches[rank]))
        if single.output == "mixture_density":
            for i, (mine, theirs) in enumerate(zip(parallel.predict_distribution(batches[rank]),
                                                   single.predict_distribution(batches[rank]))):
                result["pairs"][f"predict_distribution[{i}]"] = (mine, theirs)
        result["stats"] = None
        return result

    with autocast:
        loss = _loss(out, a_parts[rank], b_parts[rank])
    loss.backward()
    result["stats"] = CommStats(**vars(parallel.comm_stats))
    reduce_gradients(parallel, reduction)
    single.zero_grad()
    with autocast:
        if scenario["reference"] == "concat":
            loss = _loss(single(x_all), a_all, b_all)
        else:
            loss = sum(_loss(single(x), a, b) for x, a, b in zip(batches, a_parts, b_parts))
    loss.backward()
    scale = WORLD_SIZE if reduction == "mean" else 1
    start, stop = parallel.expert_range
    expert_names = [f"experts.{n}" for n, _ in single.experts.named_parameters()]
    expected = _grads(single, [n for n, _ in single.named_parameters()])
    actual = _grads(parallel, [n for n, _ in parallel.named_parameters()])
    for n in expert_names:
        local_name = n.replace("experts.", "experts.local.", 1)
        result["pairs"][f"grad {n}"] = (actual[local_name], expected[n][start:stop] / scale)
    for n in expected:
        if n not in expert_names:
            result["pairs"][f"grad {n}"] = (actual[n], expected[n] / scale)
    return result


def _round_trip(rank):
    """Shard and gather back; the constructor; a subgroup, weights from rank 1, a forward,
    a training step, and gathering onto rank 0."""
    out = {}
    arguments = dict(n_experts=5, top_k=2, expert_hidden=(8,))
    single = _module(arguments, None)
    x = torch.randn(6, N_FEATURES, generator=torch.Generator().manual_seed(2))
    gathered = gather_experts(shard_experts(single), dst=1)
    if rank == 1:
        out["gathered_type"] = type(gathered).__name__
        out["gathered_state"] = _state(gathered)
        out["single_state"] = _state(single)
        out["gathered_predict"] = (gathered.eval().predict(x), single.eval().predict(x))
    else:
        out["gathered_none"] = gathered is None
    # the constructor, after the same seed: the single-process module's draw, sharded
    torch.manual_seed(0)
    built = ExpertParallelMoE(N_FEATURES, N_OUTPUTS, **arguments)
    out["constructed_state"] = (_state(built), _state(shard_experts(single)))
    out["copy_state"] = (_state(copy.deepcopy(built)), _state(built))

    # rank 0 starts from other weights; src=1 makes every rank take rank 1's
    group = dist.new_group([0, 1])
    mine = _module(arguments, None, seed=1 - rank)
    parallel = shard_experts(mine, group=group, src=1)
    reference = _module(arguments, None, seed=0)
    out["subgroup_forward"] = (parallel(x).output.detach(), reference(x).output.detach())
    with torch.no_grad():  # a "training step": every rank changes its experts and the router alike
        for p in [*parallel.parameters(), *reference.parameters()]:
            p.add_(0.5)
    back = gather_experts(parallel, dst=0)
    if rank == 0:
        out["trained_state"] = (_state(back), _state(reference))
    else:
        out["trained_none"] = back is None
    return out


def _split(rank):
    """split_expert over the ranks: exact copies from rank 0's expert 1 onto rank 1's experts,
    and a perturbed copy from rank 1 onto rank 0, each rank drawing from its own generator."""
    arguments = dict(n_experts=5, top_k=2, expert_hidden=(8,), router="noisy_topk")  # experts 0-2 | 3-4
    single = _module(arguments, None)
    parallel = shard_experts(copy.deepcopy(single))
    parallel.split_expert(1, [3, 4], noise=0.0)
    single.split_expert(1, [3, 4], noise=0.0)
    out = {"exact": gather_experts(parallel, dst=0)}
    if rank == 0:
        out["exact"] = (_state(out["exact"]), _state(single))
    parallel.split_expert(4, 0, noise=0.1, generator=torch.Generator().manual_seed(rank))
    out["router"] = _state(parallel.router)
    out["perturbed"] = gather_experts(parallel, dst=0)
    return out


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _errors(rank):
    """The refusals that need an initialised process group: (case, error type, message)."""
    cases = {
        "adapter": lambda: ExpertParallelMoE(N_FEATURES, N_OUTPUTS, n_experts=4, expert_type="adapter"),
        "too_few_experts": lambda: ExpertParallelMoE(N_FEATURES, N_OUTPUTS, n_experts=1, top_k=1),
        "adapter_from_module": lambda: shard_experts(MixtureOfExperts(N_FEATURES, N_OUTPUTS, expert_type="adapter")),
        "already_parallel": lambda: shard_experts(shard_experts(MixtureOfExperts(N_FEATURES, N_OUTPUTS, n_experts=4))),
        "split_expert": lambda: shard_experts(MixtureOfExperts(N_FEATURES, N_OUTPUTS, n_experts=4)).split_expert(0, 0),
        "reduction": lambda: reduce_gradients(ExpertParallelMoE(N_FEATURES, N_OUTPUTS, n_experts=4), "max"),
        "gather_dst": lambda: gather_experts(ExpertParallelMoE(N_FEATURES, N_OUTPUTS, n_experts=4), dst=2),
        "bad_counts": lambda: ExpertParallelMoE(N_FEATURES, N_OUTPUTS, n_experts=4).experts(
            torch.zeros(3, N_FEATURES), torch.zeros(3, dtype=torch.long)),
    }
    found = {}
    for case, call in cases.items():
        try:
            call()
            found[case] = (None, "")
        except Exception as error:  # noqa: BLE001 - recorded for the test process
            found[case] = (type(error).__name__, str(error))
    return found


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    results = {}
    try:
        for name in SCENARIOS:
            results[name] = _run_scenario(name, rank)
        results["round_trip"] = _round_trip(rank)
        results["split"] = _split(rank)
        results["errors"] = _errors(rank)
    except Exception:  # noqa: BLE001 - reported by the test process
        results["traceback"] = traceback.format_exc()
    finally:
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    mp = pytest.importorskip("torch.multiprocessing")
    out_dir = tmp_path_factory.mktemp("expert_parallel")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    found = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    for rank, result in enumerate(found):
        assert "traceback" not in result, f"rank {rank} failed:\n{result['traceback']}"
    return found


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_outputs_and_gradients_equal_single_process(results, scenario):
    for rank in range(WORLD_SIZE):
        pairs = results[rank][scenario]["pairs"]
        assert any(name.startswith("grad ") for name in pairs) == SCENARIOS[scenario]["train"]
        rtol, atol = SCENARIOS[scenario]["tolerance"]
        for name, (actual, expected) in pairs.items():
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m, n=name, r=rank:
                                       f"rank {r}, {scenario}, {n}: {m}")


def test_scenarios_route_as_intended(results):
    # uneven loads and experts without rows are what the scenarios are for
    routed = {name: [results[r][name]["experts_routed"] for r in range(WORLD_SIZE)] for name in SCENARIOS}
    top1 = sum(routed["top1_uneven"], [])
    assert 4 not in top1 and top1.count(0) > top1.count(1)
    assert 3 not in sum(routed["top2_embedded"], [])
    assert routed["idle_rank"][1] == [] and not {2, 3} & set(routed["idle_rank"][0])
    assert not {2, 3} & set(sum(routed["idle_experts_embedded"], []))
    assert results[0]["top1_uneven"]["range"] == (0, 3) and results[1]["top1_uneven"]["range"] == (3, 5)
    bf16 = [results[r]["idle_experts_bf16"] for r in range(WORLD_SIZE)]
    assert bf16[0]["pairs"]["assignments.outputs"][0].dtype == torch.bfloat16
    assert bf16[1]["stats"].rows_sent == 3 and bf16[1]["stats"].rows_received == 0
    # the cap dropped (and rerouted) assignments
    counts = results[0]["capacity"]["pairs"]["expert_counts"][0]
    assert int(counts.max()) > 5  # routed before the cap; rank 0's cap is ceil(1.0 * 10 rows * 2 / 4) = 5
    kept = torch.bincount(torch.tensor(routed["capacity"][0]), minlength=4)
    assert int(kept.max()) <= 5


@pytest.mark.parametrize("scenario", ["top1_uneven", "top2_embedded", "idle_rank", "idle_experts_bf16"])
def test_bytes_counter_matches_a_hand_count(results, scenario):
    n_experts = SCENARIOS[scenario]["module"]["n_experts"]
    s_in, s_out = 4, 2 if SCENARIOS[scenario]["autocast"] else 4  # float32 rows; bf16 outputs under autocast
    for rank in range(WORLD_SIZE):
        result = results[rank][scenario]
        start, stop = result["range"]
        d, w = result["in_features"], result["out_features"]
        mine = result["experts_routed"]
        other = results[1 - rank][scenario]["experts_routed"]
        sent = sum(not start <= e < stop for e in mine)  # assignments to the other rank's experts
        received = sum(start <= e < stop for e in other)  # the other rank's assignments to mine
        rows_need_grad = scenario == "top2_embedded"  # only an embedded input has a gradient
        expected = CommStats(
            count_bytes=8 * (n_experts - (stop - start)),
            row_bytes=s_in * sent * d,
            output_bytes=s_out * received * w,
            backward_bytes=s_out * sent * w + (s_in * received * d if rows_need_grad else 0),
            rows_sent=sent,
            rows_received=received,
            exchanges=1,
        )
        assert result["stats"] == expected, (rank, scenario)
        assert result["stats"].total_bytes == expected.forward_bytes + expected.backward_bytes


def _assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_shard_and_gather_round_trip(results):
    assert results[0]["round_trip"]["gathered_none"] and results[1]["round_trip"]["trained_none"]
    trip = results[1]["round_trip"]
    assert trip["gathered_type"] == "MixtureOfExperts"
    _assert_same_state(trip["gathered_state"], trip["single_state"])
    torch.testing.assert_close(*trip["gathered_predict"], rtol=0, atol=0)
    for rank in range(WORLD_SIZE):
        trip = results[rank]["round_trip"]
        _assert_same_state(*trip["constructed_state"])
        _assert_same_state(*trip["copy_state"])
        torch.testing.assert_close(*trip["subgroup_forward"], rtol=RTOL, atol=ATOL)
    _assert_same_state(*results[0]["round_trip"]["trained_state"])


def test_split_expert_copies_an_expert_onto_other_ranks_experts(results):
    # exact copies: as the single-process module splits
    _assert_same_state(*results[0]["split"]["exact"])
    # perturbed, each rank drawing from its own generator: the replicated router stays the
    # same on every rank, the copy is near its source and not equal to it
    _assert_same_state(results[0]["split"]["router"], results[1]["split"]["router"])
    state = results[0]["split"]["perturbed"].state_dict()
    for name in ("experts.hidden.0.weight", "experts.output.weight"):
        copy, source = state[name][0], state[name][4]
        assert not torch.equal(copy, source), name
        torch.testing.assert_close(copy, source, rtol=0.6, atol=1e-6, msg=name)


def test_refusals_inside_a_process_group(results):
    for rank in range(WORLD_SIZE):
        errors = results[rank]["errors"]
        assert errors["adapter"][0] == "ValueError" and "data parallel" in errors["adapter"][1]
        assert errors["adapter_from_module"][0] == "ValueError" and "adapter" in errors["adapter_from_module"][1]
        assert errors["too_few_experts"][0] == "ValueError" and "n_experts=1" in errors["too_few_experts"][1]
        assert errors["already_parallel"][0] == "ValueError"
        assert errors["split_expert"][0] == "ValueError" and "distinct experts" in errors["split_expert"][1]
        assert errors["reduction"][0] == "ValueError" and "'max'" in errors["reduction"][1]
        assert errors["gather_dst"][0] == "ValueError"
        assert errors["bad_counts"][0] == "ValueError" and "counts" in errors["bad_counts"][1]


def test_refusals_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(N_FEATURES, N_OUTPUTS, n_experts=4)
    with pytest.raises(TypeError, match="MixtureOfExperts"):
        shard_experts(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ExpertParallelMoE"):
        gather_experts(MixtureOfExperts(N_FEATURES, N_OUTPUTS))
    with pytest.raises(ValueError, match="at least one expert per rank"):
        expert_shards(3, 4)


def test_expert_shards():
    assert expert_shards(5, 2) == [(0, 3), (3, 5)]
    assert expert_shards(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert expert_shards(4, 1) == [(0, 4)]
