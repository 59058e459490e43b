"""Routers: exact analytic costs, latency table, budget checks, surrogate fit, router training."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import elastic_choices, tiny_config

from megatron_flextron.elastic.subnetwork import Subnetwork, count_parameters
from megatron_flextron.routers.cost import CostModel, LatencyTable, budget_loss, router_choices
from megatron_flextron.routers.static import StaticRouter
from megatron_flextron.routers.surrogate import Surrogate, encode, fit_surrogate
from megatron_flextron.routers.training import router_report, train_static_router


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_params_cost_is_exact_for_per_layer_architectures(family):
    model = tiny_config(family)
    elastic = elastic_choices(model)
    cost = CostModel(model, elastic, "params")
    mlp, heads = router_choices(model, elastic)
    for widths, counts in [((128,) * 4, (8,) * 4), ((32, 64, 128, 96), (4, 8, 4, 8))]:
        subnet = Subnetwork(widths, counts, (0, 1, 2, 3))
        assert cost.of_subnetwork(widths, counts) == count_parameters(subnet, model)["total"]
        skipping = Subnetwork(widths, counts, (0, 2))  # layers 1 and 3 skipped: no parameters
        params = count_parameters(skipping, model)["total"]
        assert cost.of_subnetwork(widths, counts, (0, 2)) == params
    # expected cost of soft probabilities = probability-weighted costs (linear), with gradients
    p_mlp = torch.full((4, len(mlp)), 1 / len(mlp), dtype=torch.float64, requires_grad=True)
    p_heads = torch.zeros(4, len(heads), dtype=torch.float64)
    p_heads[:, 0] = 1
    expected = sum(cost.of_subnetwork((k,) * 4, (8,) * 4) for k in mlp) / len(mlp)
    value = cost(p_mlp, p_heads)
    assert float(value) == pytest.approx(expected)
    value.backward()
    assert (p_mlp.grad[:, 0] > p_mlp.grad[:, -1]).all()  # wider costs more


def test_flops_kv_and_latency_costs():
    model = tiny_config("llama")
    elastic = elastic_choices(model)
    flops = CostModel(model, elastic, "flops", seq_length=64)
    kv = CostModel(model, elastic, "kv_cache")
    full, small = ((128,) * 4, (8,) * 4), ((32,) * 4, (4,) * 4)
    # matmul FLOPs: 2 x (non-embedding params of the matmuls + output layer) + attention scores
    assert flops.of_subnetwork(*small) < flops.of_subnetwork(*full)
    # GQA keeps every KV group: trimming query heads leaves the KV cache as it is
    assert kv.of_subnetwork(*small) == kv.of_subnetwork(*full) == 4 * 2 * 4 * 16 * 2
    table = LatencyTable({128: 4.0, 96: 3.0, 64: 2.0, 32: 1.0}, {8: 2.0, 4: 1.0}, 5.0, 0.5)
    latency = CostModel(model, elastic, "latency", latency=table)
    assert latency.of_subnetwork((128, 32, 64, 96), (8, 4, 4, 8)) == 5.0 + 4 * 0.5 + 10.0 + 6.0
    with pytest.raises(ValueError, match="latency table"):
        CostModel(model, elastic, "latency")


def test_budget_loss_has_a_dead_zone():
    assert float(budget_loss(torch.tensor(0.505), 0.5, tolerance=0.02)) == 0.0
    assert float(budget_loss(torch.tensor(0.6), 0.5, tolerance=0.02)) == pytest.approx(0.18)


@pytest.mark.parametrize(
    "budgets, message",
    [
        ([1.0, 0.0], "must lie in"),
        ([1.2, 0.5], "must lie in"),
        ([1.0, float("nan")], "must lie in"),
        ([0.5, 1.0], "sorted descending"),
        ([], "at least one"),
    ],
)
def test_bad_budget_lists_are_refused(budgets, message):
    with pytest.raises(ValueError, match=message):
        StaticRouter(budgets, 4, [128, 64], [8, 4])


def test_budget_encoding_blends_neighbours_and_refuses_outside():
    router = StaticRouter([1.0, 0.5, 0.25], 2, [128, 64], [8, 4])
    assert router.encode(0.5).tolist() == [0, 1, 0]
    assert router.encode(0.75).tolist() == pytest.approx([0.5, 0.5, 0])
    assert router.encode(0.3).tolist() == pytest.approx([0, 0.2, 0.8])
    for bad in (0.2, 0.0, -1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            router.encode(bad)


SKIP_PENALTY = torch.tensor([3.0, 0.4, 0.2, 3.0])  # what skipping each layer costs in loss


def _synthetic_loss(p_mlp, p_heads, mlp, heads, p_keep=None):
    """A known quality function: each layer loses more the narrower it is; later layers more;
    a skipped layer loses SKIP_PENALTY instead (the middle layers are cheap to skip)."""
    layers = p_mlp.shape[-2]
    w = torch.linspace(0.5, 1.5, layers)
    mlp_frac = p_mlp @ (torch.tensor(mlp, dtype=torch.float) / mlp[0])
    head_frac = p_heads @ (torch.tensor(heads, dtype=torch.float) / heads[0])
    per_layer = (1 - mlp_frac) ** 2 * w + 0.5 * (1 - head_frac) * w
    if p_keep is not None:
        per_layer = p_keep * per_layer + (1 - p_keep) * SKIP_PENALTY
    return 2.0 + per_layer.sum(-1)


def _fitted_surrogate(model, elastic, count=200, layer_skipping=False):
    from megatron_flextron.routers.surrogate import sample_architectures

    mlp, heads = router_choices(model, elastic)
    archs = sample_architectures(count, model.num_layers, mlp, heads, 1, layer_skipping)
    p_mlp, p_heads, p_keep = encode(archs, mlp, heads)
    losses = _synthetic_loss(p_mlp, p_heads, mlp, heads, p_keep)
    torch.manual_seed(0)
    surrogate = Surrogate(model.num_layers, len(mlp), len(heads), hidden_size=64)
    fit = fit_surrogate(surrogate, p_mlp, p_heads, losses, steps=1500, p_keep=p_keep)
    return surrogate, fit


def test_surrogate_fits_a_known_loss_function():
    model = tiny_config("llama")
    _, fit = _fitted_surrogate(model, elastic_choices(model))
    # stated error: held-out mean relative error under 2% over a loss range of about 2 to 5
    assert fit["heldout_relative_mae"] < 0.02, fit
    assert fit["loss_range"][1] - fit["loss_range"][0] > 1.0


def test_router_meets_each_budget_and_interpolates_monotonically():
    model = tiny_config("llama")
    elastic = elastic_choices(model)
    surrogate, fit = _fitted_surrogate(model, elastic)
    mlp, heads = router_choices(model, elastic)
    cost = CostModel(model, elastic, "params")
    budgets = [1.0, 0.85, 0.7, 0.6]
    torch.manual_seed(0)
    router = StaticRouter(budgets, model.num_layers, mlp, heads, hidden_size=64)
    train_static_router(
        router,
        surrogate,
        cost,
        steps=800,
        lr=3e-3,
        tolerance=0.03,
        surrogate_error=fit["heldout_relative_mae"],
        max_surrogate_error=0.05,
    )
    for row in router_report(router, cost, budgets):
        assert row["feasible"]
        assert abs(row["cost_ratio"] / row["budget"] - 1) <= 0.03 + 0.02, row
    grid = [0.6 + 0.4 * i / 20 for i in range(21)]
    costs = [router_report(router, cost, [b])[0]["expected_cost_ratio"] for b in grid]
    assert all(a <= b + 1e-3 for a, b in zip(costs, costs[1:])), costs
    assert router.choose(1.0) == Subnetwork.full(model)


def test_router_with_layer_skipping_meets_a_budget_below_the_width_floor():
    """Narrowest widths in every layer cost 0.50 of the parameters; budget 0.4 needs skipping.
    The router skips the layers that are cheap to skip (1 and 2 of the synthetic loss) and meets
    the budget; budget 1.0 keeps every layer."""
    model = tiny_config("llama")
    elastic = elastic_choices(model)
    surrogate, fit = _fitted_surrogate(model, elastic, count=300, layer_skipping=True)
    assert fit["heldout_relative_mae"] < 0.03, fit
    mlp, heads = router_choices(model, elastic)
    cost = CostModel(model, elastic, "params")
    floor = cost.of_subnetwork([mlp[-1]] * 4, [heads[-1]] * 4) / cost.full()
    assert floor > 0.45
    budgets = [1.0, 0.7, 0.4]
    torch.manual_seed(0)
    router = StaticRouter(budgets, 4, mlp, heads, hidden_size=64, layer_skipping=True)
    train_static_router(router, surrogate, cost, steps=800, lr=3e-3, tolerance=0.03)
    rows = {row["budget"]: row for row in router_report(router, cost, budgets)}
    # The router trains its expected (soft) cost under the budget; its hard choice (the argmax
    # of every layer's probabilities) is feasible, but how far below the budget it lands
    # depends on near-ties between widths that move with the CPU's float kernels (measured on
    # one machine: hard 0.318 and expected 0.374 at budget 0.4; on another, within 5%; on a
    # third, hard 0.404 and expected 0.447). The hard choice is what serves; the expected cost
    # only has to be near the budget after 800 steps.
    for budget in (0.4, 0.7):
        row = rows[budget]
        assert row["feasible"] and 0.75 * budget <= row["cost_ratio"] <= 1.05 * budget, row
        assert 0.9 * budget <= row["expected_cost_ratio"] <= 1.2 * budget, row
    assert rows[0.4]["cost_ratio"] < floor  # it met the budget by skipping layers
    skipped = set(range(4)) - set(router.choose(0.4).layers)
    assert skipped and skipped <= {1, 2}, rows[0.4]
    assert router.choose(1.0) == Subnetwork.full(model)


def test_router_refuses_an_untrustworthy_surrogate():
    model = tiny_config("llama")
    elastic = elastic_choices(model)
    mlp, heads = router_choices(model, elastic)
    router = StaticRouter([1.0, 0.5], model.num_layers, mlp, heads)
    with pytest.raises(ValueError, match="max-surrogate-error"):
        train_static_router(
            router,
            Surrogate(4, len(mlp), len(heads)),
            CostModel(model, elastic),
            surrogate_error=0.3,
            max_surrogate_error=0.1,
        )
    assert not math.isnan(float(router(1.0)[0].sum()))


@pytest.mark.usefixtures("megatron_single_process")
def test_budget_flag_of_convert_and_evaluate_uses_the_trained_router(tmp_path):
    from helpers import evaluate_rows, write_training_setup

    from megatron_flextron.checkpoint.state import CheckpointError
    from megatron_flextron.convert import ConvertOptions, convert
    from megatron_flextron.routers.checkpoint import save_router

    setup = write_training_setup(str(tmp_path), docs=100)
    model, ckpt = setup["model"], setup["load"]
    elastic = elastic_choices(model)
    flags = dict(data="wiki:test", seq_length=32, max_sequences=4)
    budget = dict(budgets=[0.7], require_router=True)  # tools/evaluate.py --budget 0.7
    with pytest.raises(CheckpointError, match="no trained static router"):
        evaluate_rows(ckpt, **flags, **budget)
    # without a router, --budget-list falls back to training's nearest-choice rule
    assert evaluate_rows(ckpt, **flags, budgets=[1.0])[0]["chosen_by"] == ("nearest choices")

    surrogate, fit = _fitted_surrogate(model, elastic)
    mlp, heads = router_choices(model, elastic)
    cost = CostModel(model, elastic, "params")
    torch.manual_seed(0)
    router = StaticRouter([1.0, 0.6], model.num_layers, mlp, heads, hidden_size=64)
    train_static_router(router, surrogate, cost, steps=300, lr=3e-3)
    save_router(ckpt, router, {"metric": "params", "seq_length": 2048, "latency_table": None})
    expected = router.choose(0.7)  # between the trained budgets: the blended input

    out = convert(
        ConvertOptions(
            loader="flextron",
            saver="megatron",
            load_dir=ckpt,
            save_dir=str(tmp_path / "exported"),
            budget=0.7,
        )
    )
    choice = out.metadata["router_choice"]
    assert choice["subnetwork"] == expected.to_dict() and choice["chosen_by"] == "static router"
    assert choice["cost_ratio"] == pytest.approx(
        cost.of_subnetwork(expected.mlp, expected.heads) / cost.full(), abs=1e-4
    )
    shapes = out.layer_shapes or [(model.ffn_hidden_size, model.num_attention_heads)] * 4
    assert [tuple(s) for s in shapes] == list(zip(expected.mlp, expected.heads))

    result = evaluate_rows(ckpt, **flags, **budget)[0]
    assert result["subnetwork"] == expected.to_dict() and result["chosen_by"] == "static router"
    assert result["params"] == count_parameters(expected, model)["total"]
    with pytest.raises(ValueError, match="outside the trained range"):
        evaluate_rows(ckpt, **flags, budgets=[0.5], require_router=True)


def test_budget_policies_answer_which_subnetwork_a_budget_runs():
    """The one answer to "which sub-network is budget b": the nearest choices without a router
    (training's rule), the router's argmax with its exact cost ratio with one."""
    from megatron_flextron.routers.policy import NearestChoices, StaticRouterPolicy
    from megatron_flextron.routers.sampling import budget_subnetwork

    model = tiny_config("llama")
    elastic = elastic_choices(model)
    nearest = NearestChoices(model, elastic)
    for b in (1.0, 0.75, 0.5, 0.3):
        choice = nearest.choose(b)
        assert choice.subnetwork == budget_subnetwork(b, model, elastic) and not nearest.routes(b)
        assert choice.info == {"chosen_by": "nearest choices"}
    params = count_parameters(nearest.choose(0.5).subnetwork, model)["total"]
    assert nearest.describe(0.5).endswith(f"{params / 1e6:.1f}M parameters")
    mlp, heads = router_choices(model, elastic)
    torch.manual_seed(0)
    router = StaticRouter([1.0, 0.5], model.num_layers, mlp, heads, hidden_size=32)
    cost = CostModel(model, elastic, "params")
    static = StaticRouterPolicy(model, elastic, router, cost, {"metric": "params"})
    choice = static.choose(0.7)
    subnet = router.choose(0.7)
    assert choice.subnetwork == subnet and static.routes(0.7)
    exact = cost.of_subnetwork(subnet.mlp, subnet.heads, subnet.layers) / cost.full()
    assert choice.info["chosen_by"] == "static router"
    assert choice.info["cost_ratio"] == round(exact, 4) and choice.info["metric"] == "params"


def test_budget_policy_checks_a_budget_before_running_it():
    """What serving asks of any policy before batching a request: a number in (0, 1], and, for
    token routers (conditioned on it), one inside their trained range; they need a budget."""
    from megatron_flextron.routers.policy import NearestChoices
    from megatron_flextron.routers.token_training import TrainedTokenRouting

    model = tiny_config("llama")
    nearest = NearestChoices(model, elastic_choices(model))
    assert nearest.check_budget(1) == 1.0 and isinstance(nearest.check_budget(1), float)
    assert nearest.check_budget(0.3) == 0.3 and not nearest.budget_required
    for bad, message in [("half", "budget must be a number"), (True, "budget must be a number"),
                         (1.5, r"budget 1.5 must lie in \(0, 1\]"), (0.0, "must lie in"),
                         (math.nan, "must lie in")]:
        with pytest.raises(ValueError, match=message):
            nearest.check_budget(bad)
    token = TrainedTokenRouting([], [1.0, 0.5])
    assert token.budget_required and token.check_budget(0.75) == 0.75
    with pytest.raises(ValueError, match=r"outside the trained range \[0.5, 1.0\]"):
        token.check_budget(0.3)
    with pytest.raises(ValueError, match="budget must be a number"):
        token.check_budget("half")


def test_a_budget_below_the_smallest_subnetwork_says_what_it_runs(capsys):
    """Without a router, budget 0.05 cannot be met: the choice (and stderr, once) names the
    smallest sub-network it runs and its share of the parameters; 0.3 rounds, says nothing."""
    from megatron_flextron.routers.policy import NearestChoices

    model = tiny_config("llama")
    nearest = NearestChoices(model, elastic_choices(model))
    mlp, heads = elastic_choices(model).choices_with_full(model)
    smallest = Subnetwork((mlp[-1],) * 4, (heads[-1],) * 4, (0, 1, 2, 3))
    ratio = count_parameters(smallest, model)["total"] / count_parameters(
        Subnetwork.full(model), model
    )["total"]
    note = (
        f"budget 0.05 is below the smallest sub-network (MLP {mlp[-1]} of 128, {heads[-1]} of 8 "
        f"heads): it runs that, {smallest.to_dict()}, {ratio:.3f} of the full model's parameters"
    )
    for _ in range(2):
        choice = nearest.choose(0.05)
        assert choice.subnetwork == smallest and choice.info["note"] == note
    assert capsys.readouterr().err == f"warning: {note}\n"
    assert "note" not in nearest.choose(0.3).info and capsys.readouterr().err == ""
