"""Elastic continued pretraining of a mixture of experts: every budget samples MoE sub-networks
(fewer experts, narrower experts, smaller top-k) by its active or total parameter count, the loss
falls at every budget, megatron's load-balancing loss is logged per budget, and an expert-parallel
run (EP=2) equals the data-parallel run of the same ranks."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import tiny_moe, training_flags, write_training_setup
from helpers import train_history as _train

from megatron_flextron.config import ElasticConfig
from megatron_flextron.elastic import Subnetwork, count_parameters
from megatron_flextron.routers.sampling import budget_subnetwork

pytestmark = pytest.mark.usefixtures("megatron_single_process")

MODEL = tiny_moe(moe_shared_expert_intermediate_size=32)
RUN = dict(
    train_iters=12,
    lr=1e-2,
    min_lr=1e-3,
    eval_interval=6,
    moe_aux_loss_coeff=0.01,
    moe_router_load_balancing_type="aux_loss",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("moe")), model=MODEL)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ref"), "ep1", 1, training_flags(setup, **RUN))


@pytest.mark.parametrize("budget_type", ["active", "total"])
def test_a_budget_is_the_largest_moe_subnetwork_that_fits(budget_type):
    model = dataclasses.replace(MODEL, vocab_size=320)
    elastic = dataclasses.replace(ElasticConfig.from_ratios(model), budget_type=budget_type)
    full = count_parameters(Subnetwork.full(model), model)[budget_type]
    for budget in (0.9, 0.75):
        subnet = budget_subnetwork(budget, model, elastic)
        assert 0.6 * budget * full < count_parameters(subnet, model)[budget_type] <= budget * full
    smallest = budget_subnetwork(0.01, model, elastic)  # below every choice: the smallest
    assert smallest.moe_ffn[0] == min(elastic.moe_ffn_choices)
    subnet = budget_subnetwork(0.9, model, elastic)
    if budget_type == "total":  # memory: fewer experts
        assert subnet.experts[0] < model.num_moe_experts
    else:  # compute per token: every expert kept, top-k or width cut
        assert subnet.experts[0] == model.num_moe_experts
        assert subnet.topk[0] < model.moe_router_topk or subnet.moe_ffn[0] < 32 or (
            subnet.heads[0] < model.num_attention_heads
        )


def test_loss_falls_at_every_budget_and_the_aux_loss_is_logged(reference):
    first, last = reference[5]["eval"], reference[-1]["eval"]
    assert set(first) == {"1", "0.75", "0.5", "0.35"}
    for budget in first:
        assert last[budget] < first[budget], (budget, first[budget], last[budget])
    trained = {b for h in reference for b in h["budgets"]}
    assert trained == {"1", "0.75", "0.5", "0.35"}
    for h in reference:
        for budget, row in h["budgets"].items():
            assert row["moe aux loss"] > 0, (h["iteration"], budget)


def test_expert_parallel_run_equals_the_data_parallel_run(setup, tmp_path):
    """Megatron carves EP out of data parallelism: on two ranks EP=2 is DP=2 with each rank
    holding half the experts; it equals the DP=2 run holding them all (same data split)."""
    flags = training_flags(setup, **RUN)
    reference = _train(tmp_path, "dp2", 2, flags)
    history = _train(tmp_path, "ep2", 2, flags + ["--expert-model-parallel-size", "2"])
    assert len(history) == len(reference)
    for got, want in zip(history, reference):
        assert got["lm loss"] == pytest.approx(want["lm loss"], abs=2e-4), got["iteration"]
        for budget, v in got["budgets"].items():
            ref = want["budgets"][budget]
            assert v["lm loss"] == pytest.approx(ref["lm loss"], abs=2e-4)
            assert v["moe aux loss"] == pytest.approx(ref["moe aux loss"], rel=1e-3)
    for budget, loss in reference[-1]["eval"].items():
        assert history[-1]["eval"][budget] == pytest.approx(loss, abs=2e-4)
