"""The elastic trainer end to end on gloo: losses fall, TP/PP runs equal the single-process run,
a resumed run equals the uninterrupted one, checkpoints appear only when complete."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import train_history as _train
from helpers import training_flags, write_training_setup

pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("train")))


def _losses(history):
    return [h["lm loss"] for h in history]


LONG = dict(train_iters=16, lr=1e-2, min_lr=1e-3, eval_interval=4, weight_decay=0.1)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The single-process run every parallel layout must reproduce."""
    return _train(tmp_path_factory.mktemp("ref"), "tp1", 1, training_flags(setup, **LONG))


def test_loss_falls_for_the_full_model_and_every_budget(reference):
    first, last = reference[3]["eval"], reference[-1]["eval"]
    assert set(first) == {"1", "0.75", "0.5", "0.35"}
    for budget in first:
        assert last[budget] < first[budget] - 0.1, (budget, first[budget], last[budget])
    trained = {b for h in reference for b in h["budgets"]}
    assert trained == {"1", "0.75", "0.5", "0.35"}  # every budget was sampled
    for h in reference:  # in-place distillation: the full model has no teacher, the others do
        for budget, v in h["budgets"].items():
            assert (v["kd loss"] == 0.0) == (budget == "1"), (h["iteration"], budget)


@pytest.mark.parametrize(
    "layout", [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)]
)
def test_tensor_and_pipeline_parallel_runs_equal_the_single_process_run(
    setup, reference, tmp_path, layout
):
    history = _train(tmp_path, "parallel", 2, training_flags(setup, **LONG, **layout))
    assert len(history) == len(reference)
    for got, want in zip(history, reference):
        assert got["lm loss"] == pytest.approx(want["lm loss"], abs=2e-4), got["iteration"]
        assert got["budgets"].keys() == want["budgets"].keys()
        for budget, v in got["budgets"].items():
            ref = want["budgets"][budget]
            assert v["lm loss"] == pytest.approx(ref["lm loss"], abs=2e-4)
            assert v["kd loss"] == pytest.approx(ref["kd loss"], abs=2e-4)
    for budget, loss in reference[-1]["eval"].items():
        assert history[-1]["eval"][budget] == pytest.approx(loss, abs=2e-4)


def test_bf16_run_follows_the_fp32_run(setup, reference, tmp_path):
    """bf16 weights with megatron's fp32 master copies (which must start from the loaded
    checkpoint, not from the random init) track the fp32 run within bf16 precision."""
    history = _train(tmp_path, "bf16", 1, training_flags(setup, **LONG, bf16=True))
    for got, want in zip(history, reference):
        assert got["lm loss"] == pytest.approx(want["lm loss"], abs=0.03), got["iteration"]
        for budget, v in got["budgets"].items():
            assert v["kd loss"] == pytest.approx(want["budgets"][budget]["kd loss"], abs=0.02)
    for budget, loss in reference[-1]["eval"].items():
        assert history[-1]["eval"][budget] == pytest.approx(loss, abs=0.03)


def test_data_parallel_run_trains_every_budget(setup, tmp_path):
    history = _train(tmp_path, "dp2", 2, training_flags(setup, **LONG))
    first, last = history[3]["eval"], history[-1]["eval"]
    for budget in first:
        assert last[budget] < first[budget] - 0.1, (budget, first[budget], last[budget])


@pytest.mark.parametrize(
    "layout",
    # two data-parallel ranks with the distributed optimizer (its sharded state resumes too), and
    # two pipeline stages with megatron's plain optimizer
    [
        dict(use_distributed_optimizer=True),
        dict(pipeline_model_parallel_size=2),
        dict(router="joint", tensor_model_parallel_size=2),
    ],
    ids=["dp2-distributed-optimizer", "pp2", "tp2-joint-router"],
)
def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path, layout):
    from megatron_flextron.checkpoint.flextron import read_flextron

    flags = dict(train_iters=8, weight_decay=0.1, **layout)
    whole = _train(
        tmp_path, "whole", 2, training_flags(setup, save=str(tmp_path / "whole"), **flags)
    )
    parts = str(tmp_path / "parts")
    first = _train(
        tmp_path, "first", 2, training_flags(setup, save=parts, exit_interval=4, **flags)
    )
    assert [h["iteration"] for h in first] == [1, 2, 3, 4]
    assert open(os.path.join(parts, "latest_checkpointed_iteration.txt")).read() == "4"
    os.makedirs(os.path.join(parts, "iter_0000008.tmp"))  # a save killed half-way
    second = _train(tmp_path, "second", 2, training_flags(setup, save=parts, **flags))
    assert [h["iteration"] for h in second] == [5, 6, 7, 8]
    assert _losses(first + second) == _losses(whole)  # exactly
    assert [h["eval"] for h in first + second if "eval" in h] == [
        h["eval"] for h in whole if "eval" in h
    ]
    expected = ["flextron_config.json", "iter_0000004", "iter_0000008"]
    expected += ["latest_checkpointed_iteration.txt"]
    expected += ["router", "tokenizer"] if layout.get("router") else ["tokenizer"]
    assert sorted(os.listdir(parts)) == expected
    a, b = read_flextron(str(tmp_path / "whole")), read_flextron(parts)
    assert a.state.keys() == b.state.keys()
    for name in a.state:
        assert torch.equal(a.state[name], b.state[name]), name
    assert b.metadata["training"] == {"iteration": 8, "consumed_train_samples": 64, "tokens": 2048}


JOINT = dict(LONG, train_iters=32, eval_interval=8, router="joint", router_lr=1e-2)
JOINT["budget_list"] = [1.0, 0.8, 0.6]


@pytest.fixture(scope="module")
def joint_reference(setup, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("joint"), "joint", 1, training_flags(setup, **JOINT))


def test_joint_router_meets_each_budget_while_the_model_trains(joint_reference):
    """--router joint: budget micro-batches run the router's sampled per-layer architecture;
    by the end its argmax architecture's parameter cost approaches every budget."""
    evals = [h for h in joint_reference if "eval" in h]
    last = evals[-1]["router cost ratio"]
    seen = [e["router cost ratio"] for e in evals]
    # 32 short iterations: within 8% of each budget (measured 0.794 for 0.8, 0.639 for 0.6),
    # ordered, and budget 1.0 (pulled to the largest choices) the full model
    for budget, ratio in last.items():
        assert abs(ratio / float(budget) - 1) < 0.08, (budget, seen)
    assert last["1"] == 1.0 and last["0.8"] > last["0.6"], seen
    assert evals[-1]["eval"]["1"] < evals[0]["eval"]["1"]  # the model trains meanwhile
    assert all(
        "router cost ratio" in v for b, v in joint_reference[-1]["budgets"].items() if b != "1"
    )


@pytest.mark.parametrize(
    "layout", [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)]
)
def test_joint_router_runs_equal_under_tp_and_pp(setup, joint_reference, tmp_path, layout):
    """The router's gradient is summed over TP ranks and PP stages: same run as one process."""
    history = _train(tmp_path, "joint_parallel", 2, training_flags(setup, **JOINT, **layout))
    for got, want in zip(history, joint_reference):
        assert got["lm loss"] == pytest.approx(want["lm loss"], abs=2e-4), got["iteration"]
        for budget, v in got["budgets"].items():
            ref = want["budgets"][budget]
            assert v.get("router cost ratio") == pytest.approx(ref.get("router cost ratio"))


def test_joint_router_starts_from_the_checkpoints_phase2_router(setup, tmp_path):
    """Phase 3 after phase 2: a trained static router in the --load checkpoint (same budgets and
    choices) is where --router joint starts; here one that picks the narrowest choices."""
    import shutil

    from megatron_flextron.checkpoint.flextron import read_config
    from megatron_flextron.config import ElasticConfig, ModelConfig
    from megatron_flextron.routers.checkpoint import save_router
    from megatron_flextron.routers.cost import CostModel, router_choices
    from megatron_flextron.routers.static import StaticRouter

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["load"], ckpt)
    config = read_config(str(ckpt))
    model_cfg = ModelConfig.from_dict(config["model"])
    elastic = ElasticConfig.from_dict(config["elastic"])
    mlp, heads = router_choices(model_cfg, elastic)
    router = StaticRouter(JOINT["budget_list"], model_cfg.num_layers, mlp, heads)
    with torch.no_grad():
        bias = router.net[2].bias.view(model_cfg.num_layers, len(mlp) + len(heads))
        bias[:, len(mlp) - 1] = bias[:, -1] = 100.0  # the narrowest MLP and head count
    save_router(str(ckpt), router, {"metric": "params", "seq_length": 2048, "latency_table": None})
    flags = training_flags(setup, **dict(JOINT, train_iters=3, eval_interval=0), load=str(ckpt))
    history = _train(tmp_path, "phase3", 1, flags)
    cost = CostModel(model_cfg, elastic, "params")
    smallest = cost.of_subnetwork([mlp[-1]] * 4, [heads[-1]] * 4) / cost.full()
    ratios = [
        v["router cost ratio"]
        for h in history
        for v in h["budgets"].values()
        if "router cost ratio" in v
    ]
    assert ratios and all(r == pytest.approx(smallest) for r in ratios), (ratios, smallest)


SKIP = dict(JOINT, router_layer_skipping=True)
SKIP["budget_list"] = [1.0, 0.5]


@pytest.fixture(scope="module")
def skipping_reference(setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("skip_run") / "ckpt"
    flags = training_flags(setup, **SKIP, save=str(save), save_interval=32)
    return save, _train(tmp_path_factory.mktemp("skip"), "skip", 1, flags)


def test_joint_router_skips_layers_to_meet_a_budget_below_the_width_floor(
    setup, skipping_reference
):
    """--router-layer-skipping: the narrowest widths in every layer cost 0.553 of the
    parameters, so budget 0.5 needs skipping; the router learns to skip and meets it."""
    from megatron_flextron.checkpoint.flextron import read_config
    from megatron_flextron.config import ElasticConfig, ModelConfig
    from megatron_flextron.routers.checkpoint import load_budget_policy

    save, history = skipping_reference
    last = [h for h in history if "eval" in h][-1]["router cost ratio"]
    assert abs(last["0.5"] / 0.5 - 1) < 0.08 and last["1"] == 1.0, last
    config = read_config(str(save))
    model_cfg = ModelConfig.from_dict(config["model"])
    elastic = ElasticConfig.from_dict(config["elastic"])
    choice = load_budget_policy(str(save), model_cfg, elastic, require_router=True).choose(0.5)
    subnet, info = choice.subnetwork, choice.info
    assert len(subnet.layers) < model_cfg.num_layers, (subnet, info)
    assert info["cost_ratio"] == pytest.approx(last["0.5"], abs=1e-3)


@pytest.mark.parametrize(
    "layout", [dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)]
)
def test_joint_router_with_layer_skipping_under_tp2_and_pp2_equals_one_process(
    setup, skipping_reference, tmp_path, layout
):
    """Each stage gates its own layers (by global index) with the replicated router's keep
    choices; the router's gradient is summed over the stages, and the gate's (the residual
    stream is replicated over TP) counted once over TP ranks."""
    _, want = skipping_reference
    flags = training_flags(setup, **SKIP, **layout)
    history = _train(tmp_path, "skip_pp2", 2, flags)
    for got, ref in zip(history, want):
        assert got["lm loss"] == pytest.approx(ref["lm loss"], abs=2e-4), got["iteration"]
        for budget, v in got["budgets"].items():
            r = ref["budgets"][budget]
            assert v.get("router cost ratio") == pytest.approx(r.get("router cost ratio"))


def test_frozen_teacher_starts_equal_to_the_student(setup, tmp_path):
    history = _train(
        tmp_path, "frozen", 1, training_flags(setup, train_iters=4, distill="frozen", lr=1e-2)
    )
    first = history[0]["budgets"]
    assert first["1"]["kd loss"] < 1e-6  # the original model distils into itself
    assert all(v["kd loss"] > 1e-4 for b, v in first.items() if b != "1")
    assert history[-1]["budgets"].get("1", {"kd loss": 1.0})["kd loss"] > 1e-6


def test_sigkilled_rank_restarts_from_the_last_checkpoint(setup, tmp_path):
    """torchrun --max-restarts 1: kill one rank with SIGKILL after the first checkpoint; the
    restarted workers resume from it, finish, and replay the lost iterations identically."""
    from distributed import free_port
    from launch import clean_env, log_text, start, stop, torchrun_cmd, wait_for, workers

    save, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    argv = training_flags(
        setup,
        train_iters=40,
        seq_length=64,
        micro_batch_size=4,
        global_batch_size=16,
        eval_interval=0,
        save=str(save),
        save_interval=4,
        metrics_file=str(metrics),
    )
    cmd = torchrun_cmd(argv, 2, f"127.0.0.1:{free_port()}", max_restarts=1)
    log = tmp_path / "torchrun.log"
    proc = start(cmd, clean_env(), log)  # its own session: nothing outlives a failed test
    tracker = save / "latest_checkpointed_iteration.txt"
    try:
        wait_for(tracker.exists, 240, "first checkpoint", [proc])
        ranks = workers(proc)
        assert ranks, "no worker to kill"
        killed_after = int(tracker.read_text())
        ranks[max(ranks)].kill()  # SIGKILL
        rc = proc.wait(timeout=300)
    finally:
        stop(proc)
    out = log_text(log)
    assert rc == 0, out[-3000:]
    assert killed_after < 40 and "resuming from" in out, out[-3000:]
    assert tracker.read_text() == "40"
    seen = {}
    for line in metrics.read_text().splitlines():
        h = json.loads(line)
        if h["iteration"] in seen:  # replayed after the restart: identical
            assert h["lm loss"] == seen[h["iteration"]]
        seen[h["iteration"]] = h["lm loss"]
    assert sorted(seen) == list(range(1, 41))
