"""The static and joint routers over a mixture of experts' axes (experts, expert width, top-k,
beside heads): the soft cost equals the parameter count at a one-hot, the router picks valid MoE
sub-networks and round trips, the soft MoE layer equals the sliced one at a one-hot and passes
gradients to the probabilities, and --router joint trains on an MoE (TP=1, EP=2 = DP=2)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from helpers import (
    BATCH,
    SEQ,
    batch,
    elastic_choices,
    random_canonical_state,
    tiny_config,
    tiny_moe,
    train_history,
    training_flags,
    write_training_setup,
)

from megatron_flextron.config import ElasticConfig
from megatron_flextron.elastic import Subnetwork, count_parameters, set_subnetwork
from megatron_flextron.elastic.blocks import hybrid_name, transformer_blocks
from megatron_flextron.elastic.hybrid import build_hybrid_model
from megatron_flextron.elastic.soft_architecture import MoEProbabilities, set_soft_architecture
from megatron_flextron.elastic.state import reset_elastic_state
from megatron_flextron.routers.cost import CostModel, moe_router_choices, one_hot, router_choices
from megatron_flextron.routers.static import StaticRouter

pytestmark = pytest.mark.usefixtures("megatron_single_process")

SHARED = tiny_moe(moe_shared_expert_intermediate_size=32)
SIGMOID = tiny_moe(
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_topk_scaling_factor=2.5,
)


def _elastic(m, budget_type="active"):
    elastic = ElasticConfig.from_ratios(m, (1.0, 0.75, 0.5, 0.25), (1.0, 0.5))
    return dataclasses.replace(elastic, budget_type=budget_type)


def _random_subnets(m, elastic, count, seed=0):
    rng = random.Random(seed)
    experts, widths, topks = moe_router_choices(m, elastic)
    _, heads = router_choices(m, elastic)
    n = m.num_layers
    for _ in range(count):
        e = tuple(rng.choice(experts) for _ in range(n))
        k = tuple(rng.choice([c for c in topks if c <= x]) for x in e)
        f = tuple(rng.choice(widths) for _ in range(n))
        h = tuple(rng.choice(heads) for _ in range(n))
        yield Subnetwork((m.ffn_hidden_size,) * n, h, tuple(range(n)), experts=e, moe_ffn=f, topk=k)


@pytest.mark.parametrize("budget_type", ["active", "total"])
@pytest.mark.parametrize("m", [SHARED, SIGMOID], ids=["shared_expert", "sigmoid_bias"])
def test_soft_cost_at_a_one_hot_is_the_parameter_count(m, budget_type):
    elastic = _elastic(m, budget_type)
    cost = CostModel(m, elastic, "params")
    full = Subnetwork.full(m)
    assert cost.full() == count_parameters(full, m)[budget_type]
    counts = set()
    for subnet in _random_subnets(m, elastic, 40):
        want = count_parameters(subnet, m)[budget_type]
        assert cost.of(subnet) == want, subnet
        counts.add(want)
    assert len(counts) > 20  # the sub-networks differ in what the budget type counts
    # soft probabilities: float64, differentiable, between the smallest and the largest
    choices = [router_choices(m, elastic)[1], *moe_router_choices(m, elastic)]
    probs = [torch.rand(m.num_layers, len(c), dtype=torch.float64) for c in choices]
    probs = [p.softmax(-1).requires_grad_() for p in probs]
    ratio = cost.ratio(None, probs[0], None, *probs[1:])
    ratio.backward()
    assert ratio.dtype == torch.float64 and 0 < ratio.item() < 1
    counted = probs if budget_type == "active" else probs[:3]  # top-k holds no memory
    for p in counted:
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_flops_and_latency_costs_refuse_a_mixture_of_experts():
    for metric in ("flops", "latency"):
        with pytest.raises(ValueError, match=f"the {metric} cost is not built for mixtures"):
            CostModel(SHARED, _elastic(SHARED), metric)


def _router(m, elastic, budgets=(1.0, 0.6)):
    mlp, heads = router_choices(m, elastic)
    return StaticRouter(
        budgets, m.num_layers, mlp, heads, moe_choices=moe_router_choices(m, elastic)
    )


def test_router_picks_valid_moe_subnetworks_with_topk_capped_by_experts(tmp_path):
    from megatron_flextron.routers.checkpoint import load_router, save_router

    m = SHARED
    elastic = ElasticConfig(  # experts 8/4/1, top-k 2/1: top-2 does not fit one expert
        head_choices=(4,),
        expert_choices=(4, 1),
        moe_ffn_choices=(16,),
        topk_choices=(1,),
        budget_type="total",
    )
    router = _router(m, elastic)
    assert router.n_mlp == 0 and router.config()["moe_choices"] == moe_router_choices(m, elastic)
    n_h, n_e, n_f, n_k = router.sizes[1:]
    with torch.no_grad():  # layer 0: one expert and top-2 are the likeliest
        bias = router.net[2].bias.view(m.num_layers, sum(router.sizes))
        bias[0, n_h + n_e - 1] = bias[0, n_h + n_e + n_f] = 50.0
    subnet = router.choose(0.6)
    assert subnet.experts[0] == 1 and subnet.topk[0] == 1  # top-2 of one expert: capped
    subnet.validate(m, elastic)
    for step in range(20):  # samples are valid too (top-k drawn after the experts)
        sample = router.sample(0.6, 1.0, generator=torch.Generator().manual_seed(step))
        assert sample.mlp is None
        experts = [router.moe_choices[0][i] for i in sample.experts.argmax(-1)]
        topk = [router.moe_choices[2][i] for i in sample.topk.argmax(-1)]
        assert all(k <= e for k, e in zip(topk, experts)), (experts, topk)
    save_router(str(tmp_path), router, {"metric": "params", "budget_type": "total"})
    loaded, cost, _ = load_router(
        str(tmp_path), m, dataclasses.replace(elastic, budget_type="active")
    )
    assert loaded.config() == router.config() and cost.moe.count == "total"
    for key, value in router.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.choose(0.6) == subnet


def test_dense_router_keeps_its_stored_form():
    m = tiny_config("llama")
    elastic = elastic_choices(m)
    router = StaticRouter([1.0, 0.5], m.num_layers, *router_choices(m, elastic))
    assert "moe_choices" not in router.config() and router.moe_choices is None
    assert router.net[2].out_features == m.num_layers * (router.n_mlp + router.n_heads)
    logits = router(0.5)
    assert logits.experts is None and logits.mlp.shape == (m.num_layers, router.n_mlp)


def _model(m):
    model = build_hybrid_model(m, m.transformer_config(), elastic=True)
    state = random_canonical_state(m)
    model.load_state_dict({hybrid_name(k): v for k, v in state.items()}, strict=False)
    return model


def _straight_through(values, choices, logits):
    """A one-hot of ``values`` in the forward whose backward is softmax(logits)'s."""
    soft = logits.softmax(-1)
    return one_hot(values, choices).float() - soft.detach() + soft


@pytest.mark.parametrize("m", [SHARED, SIGMOID], ids=["shared_expert", "sigmoid_bias"])
def test_soft_moe_at_a_one_hot_equals_the_sliced_subnetwork_and_has_gradients(m):
    elastic = _elastic(m)
    model = _model(m)
    tokens, _ = batch()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    subnet = Subnetwork(
        (m.ffn_hidden_size,) * 2, (8, 4), (0, 1), experts=(6, 8), moe_ffn=(16, 32), topk=(1, 2)
    )
    set_subnetwork(model, subnet, m, elastic)
    x = torch.randn(SEQ, BATCH, m.hidden_size)
    moe_layer = transformer_blocks(model)[0].mlp
    with torch.no_grad():
        sliced, sliced_layer = model(tokens, positions, None), moe_layer(x)[0]
    mlp, heads = router_choices(m, elastic)
    moe_choices = moe_router_choices(m, elastic)
    with pytest.raises(ValueError, match="needs the full-size model"):
        set_soft_architecture(model, None, one_hot(subnet.heads, heads), mlp, heads)
    set_subnetwork(model, None, m, elastic)  # the full size, as a soft architecture needs
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, len(c), generator=g).requires_grad_() for c in [heads, *moe_choices]]
    values = [subnet.heads, subnet.experts, subnet.moe_ffn, subnet.topk]
    p_heads, *p_moe = (
        _straight_through(v, c, x) for v, c, x in zip(values, [heads, *moe_choices], logits)
    )
    moe = MoEProbabilities(*p_moe, moe_choices)
    set_soft_architecture(model, None, p_heads, mlp, heads, moe=moe)
    soft_layer = moe_layer(x)[0]
    assert torch.equal(soft_layer, sliced_layer)  # the sliced layer times masks of exactly 1
    soft = model(tokens, positions, None)
    assert (soft - sliced).abs().max() <= 1e-5  # attention: full width x head masks
    soft.float().square().mean().backward()
    for name, logit in zip(["heads", "experts", "moe_ffn", "topk"], logits):
        assert torch.isfinite(logit.grad).all() and logit.grad.abs().sum() > 0, name
    reset_elastic_state(model)
    with torch.no_grad():
        assert (model(tokens, positions, None) - sliced).abs().max() > 1e-3  # full again


# -- --router joint on an MoE, end to end (gloo) -------------------------------------------------

JOINT = dict(
    train_iters=24,
    lr=1e-2,
    min_lr=1e-3,
    eval_interval=8,
    router="joint",
    router_lr=3e-2,
    budget_list=[1.0, 0.7, 0.5],
    budget_type="total",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("moe_router")), model=SHARED)


@pytest.fixture(scope="module")
def joint(setup, tmp_path_factory):
    save = tmp_path_factory.mktemp("joint_run") / "ckpt"
    flags = training_flags(setup, **JOINT, save=str(save), save_interval=JOINT["train_iters"])
    return save, train_history(tmp_path_factory.mktemp("joint"), "joint", 1, flags)


def _initial_policy(setup):
    """The joint router a run starts from (seeded by --seed 1234)."""
    from megatron_flextron.checkpoint.load import read_model_configs
    from megatron_flextron.routers.joint import JointRouter

    _, model_cfg, elastic = read_model_configs(setup["load"])
    elastic = dataclasses.replace(elastic, budget_type=JOINT["budget_type"])
    cost = CostModel(model_cfg, elastic, "params")
    return JointRouter(model_cfg, elastic, JOINT["budget_list"], cost, seed=1234)


def test_joint_router_on_moe_moves_its_cost_toward_each_budget(setup, joint):
    """The initial router's argmax costs 0.710 / 0.670 of the total parameters for budgets
    0.7 / 0.5 (0.932 for 1.0); after 24 iterations 0.678 / 0.538 (1.0: the full model). Each
    budget's gap must shrink or end within 5%; the order must hold."""
    _, history = joint
    evals = [h["router cost ratio"] for h in history if "router cost ratio" in h]
    first, last = _initial_policy(setup).eval_stats()["router cost ratio"], evals[-1]
    print(f"router cost ratio: initial {first}, after {JOINT['train_iters']} iterations {last}")
    for budget in ("0.7", "0.5"):
        gap = [abs(e[budget] / float(budget) - 1) for e in (first, last)]
        assert gap[1] < gap[0] or gap[1] < 0.05, (budget, first, evals)
    assert last["1"] == 1.0 and last["0.7"] > last["0.5"], evals
    sampled = {b for h in history for b, v in h["budgets"].items() if "router cost ratio" in v}
    assert sampled == {"0.7", "0.5"}  # budget 1.0 runs the full model, never the router


def test_exported_router_picks_moe_subnetworks_the_tools_serve(joint):
    import json
    import os
    import subprocess
    import sys

    from megatron_flextron.checkpoint.load import read_model_configs
    from megatron_flextron.routers.checkpoint import load_budget_policy

    save, history = joint
    _, model_cfg, elastic = read_model_configs(str(save))
    policy = load_budget_policy(str(save), model_cfg, elastic, router="joint")
    choice = policy.choose(0.5)
    choice.subnetwork.validate(model_cfg, elastic)
    final = [h["router cost ratio"] for h in history if "router cost ratio" in h][-1]
    assert choice.info["cost_ratio"] == pytest.approx(final["0.5"], abs=1e-4)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "generate.py"), "--load", str(save)]
        + ["--budget", "0.5", "--max-new-tokens", "4", "--greedy", "--prompt", "The capital"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = json.loads(out.stdout.strip().splitlines()[0])
    assert line["chosen_by"] == "static router", line
    assert line["subnetwork"] == choice.subnetwork.to_dict(), line


def _same_joint_run(setup, tmp_path, reference_world: int, layout: list) -> None:
    """Six joint iterations on two ranks under ``layout`` (extra flags) equal the plain run on
    ``reference_world`` ranks: losses, the router's sampled cost ratios, and the exported
    router's weights (its gradients summed and averaged the same way)."""
    run = dict(JOINT, train_iters=6, eval_interval=6, save_interval=6)
    ref_dir, dir_ = tmp_path / "reference_ckpt", tmp_path / "ckpt"
    ref_flags = training_flags(setup, **run, save=str(ref_dir))
    reference = train_history(tmp_path, "reference", reference_world, ref_flags)
    flags = training_flags(setup, **run, save=str(dir_)) + layout
    history = train_history(tmp_path, "run", 2, flags)
    assert len(history) == len(reference)
    routed = 0
    for got, want in zip(history, reference):
        assert got["lm loss"] == pytest.approx(want["lm loss"], abs=2e-4), got["iteration"]
        for budget, v in got["budgets"].items():
            ref = want["budgets"][budget]
            assert v["lm loss"] == pytest.approx(ref["lm loss"], abs=2e-4)
            assert v.get("router cost ratio") == pytest.approx(ref.get("router cost ratio"))
            routed += "router cost ratio" in v
    assert routed > 0
    assert history[-1]["router cost ratio"] == reference[-1]["router cost ratio"]
    want, got = (torch.load(d / "router" / "static_router.pt") for d in (ref_dir, dir_))
    for name, value in want.items():  # Adam steps of ~3e-2 (router lr); TP's reduction order
        diff = (got[name] - value).abs().max()  # leaves 2.6e-6 (measured), EP's less than 1e-6
        assert diff < 1e-5, (name, diff)
    start = _initial_policy(setup).router.state_dict()
    assert any(not torch.allclose(v, start[k]) for k, v in want.items())  # and it trained


def test_expert_parallel_joint_run_equals_the_data_parallel_run(setup, tmp_path):
    """EP is carved out of DP: on two ranks EP=2 equals the DP=2 run of the same data split."""
    _same_joint_run(setup, tmp_path, 2, ["--expert-model-parallel-size", "2"])


def test_tensor_parallel_joint_run_equals_one_process(setup, tmp_path):
    """TP=2 with sequence parallelism (megatron's MoE under TP): each rank routes its own tokens
    and holds half of every expert's neurons, so the router's mask gradients are summed over
    TP; the run equals one process."""
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    _same_joint_run(setup, tmp_path, 1, layout)


def test_token_router_is_refused_for_moe_naming_why(setup):
    from megatron_flextron.training.arguments import parse_args
    from megatron_flextron.training.trainer import _policy

    args = parse_args(training_flags(setup, router="token"))
    with pytest.raises(ValueError, match="a token router picks each token's dense MLP width"):
        _policy(args, None, SHARED, None, {})


def test_phase2_static_router_on_moe_through_the_surrogate(setup, tmp_path):
    """tools/train_router.py's pipeline on an MoE checkpoint: architectures sampled over heads,
    experts, expert width and top-k, the surrogate fitted on their one-hot encodings, the router
    trained against it and stored; the tools' policy then serves its MoE sub-networks."""
    import shutil

    from megatron_flextron.checkpoint.load import read_model_configs
    from megatron_flextron.routers.checkpoint import load_budget_policy
    from megatron_flextron.routers.training import RouterPipeline, train_router_for_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["load"], ckpt)
    pipeline = RouterPipeline(
        budgets=[1.0, 0.8],
        num_architectures=24,
        samples=4,
        seq_length=32,
        surrogate_steps=200,
        router_steps=150,
        max_surrogate_error=0.5,
    )
    report = train_router_for_checkpoint(str(ckpt), pipeline, log=lambda _: None)
    assert report["surrogate"]["architectures"] == 24
    _, model_cfg, elastic = read_model_configs(str(ckpt))
    policy = load_budget_policy(str(ckpt), model_cfg, elastic, router="joint")
    for row in report["budgets"]:
        choice = policy.choose(row["budget"])
        choice.subnetwork.validate(model_cfg, elastic)
        assert row["subnetwork"] == choice.subnetwork.to_dict() and "experts" in row["subnetwork"]
        assert row["cost_ratio"] == choice.info["cost_ratio"] and row["loss"] > 0
    assert report["budgets"][0]["cost_ratio"] == 1.0  # budget 1.0 pulled to the full model
    assert report["budgets"][1]["cost_ratio"] < 0.95
