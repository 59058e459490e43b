"""MoE ranking sharded over TP=2 (sequence parallel: megatron's MoE under TP), PP=2 (the
``*E|*E`` pattern) and TP=2 x EP=2 equals one process (thorough mode: TP=2).

The statistics are compared in float64 (a float64 model: the sharded sums differ from one
process by reduction order only, 1e-7 relative leaves room for the backward's fp32 parts); in
fp32 that noise reaches 1e-4 relative on small scores, so the fast ranking's orders (fp32, as
the converter runs it) are compared where the scores they sort are apart by more than that.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from test_moe_ranking import _head_scaled, moe_config, moe_state

EXPERT_KEYS = ("reap", "frequency", "reap_total", "expert_neurons", "shared", "tokens")
DENSE_KEYS = ("activation", "taylor", "taylor_token")
SAMPLES = 6  # calibration sequences (one per micro-batch)


def _statistics(ckpt, data) -> dict:
    """Every score the fast ranking orders by, from this rank's model (collective)."""
    from test_importance import SEQ

    from megatron_flextron.importance import calibration_sequences, ranking_model
    from megatron_flextron.importance.collect import collect_statistics
    from megatron_flextron.importance.experts import expert_hooks
    from megatron_flextron.lm_step import pad_microbatches

    seqs = calibration_sequences(data, ckpt.tokenizer_dir, SAMPLES, SEQ)
    model = ranking_model(ckpt, torch.float64)
    with expert_hooks(model, ckpt.model) as hooks:
        dense = collect_statistics(model, pad_microbatches(seqs, 1), ckpt.model, True, hooks.start)
    return {**{k: dense[k] for k in DENSE_KEYS + ("layer", "loss")}, **hooks.result()}


def _rank(ckpt, data) -> tuple:
    from test_importance import SEQ

    from megatron_flextron.importance.moe_ranking import rank_and_permute_moe

    ranked = rank_and_permute_moe(ckpt, data, samples=SAMPLES, seq_length=SEQ, mode="fast")
    return ranked.metadata["importance"], ranked.elastic.layer_ranking, _statistics(ckpt, data)


def _sharded_body(rank, world_size, tp, pp, ep, ckpt_path, data, out_path):
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(tp, pp, seed=1234, expert_model_parallel_size=ep)
    result = _rank(torch.load(ckpt_path, weights_only=False), data)
    if rank == 0:
        torch.save(result, out_path)


def _same_ranking(scores: torch.Tensor, got, want, where) -> None:
    """``got`` orders the units as ``want`` does wherever their ``scores`` (the reference's,
    [..., n]) are apart by more than fp32 noise: the scores read in either order agree within
    1e-4 of the largest. Units closer than that may swap (a different reduction order)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    a, b = scores.gather(-1, got), scores.gather(-1, want)
    assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(scores.abs().max())), (where, a, b)


@pytest.fixture(scope="module")
def reference(megatron_single_process, tmp_path_factory):
    from helpers import elastic_choices
    from test_importance import _calibration_file

    from megatron_flextron.checkpoint.state import Checkpoint

    tmp = tmp_path_factory.mktemp("moe_rank")
    m = moe_config("softmax")  # with a shared expert: its neurons are dealt over TP as well
    ckpt = Checkpoint(model=m, state=_head_scaled(m, moe_state(m)), elastic=elastic_choices(m))
    data = _calibration_file(tmp / "calib.jsonl")
    torch.save(ckpt, tmp / "ckpt.pt")
    return tmp, data, _rank(ckpt, data)


@pytest.mark.parametrize("tp, pp, ep, world", [(2, 1, 1, 2), (1, 2, 1, 2), (2, 1, 2, 4)])
def test_moe_ranking_sharded_equals_one_process(reference, tp, pp, ep, world):
    tmp, data, (want, want_layers, want_stats) = reference
    out = tmp / f"tp{tp}pp{pp}ep{ep}.pt"
    run_distributed(_sharded_body, world, tp, pp, ep, str(tmp / "ckpt.pt"), data, str(out))
    info, layer_ranking, stats = torch.load(out, weights_only=False)
    where = f"tp={tp} pp={pp} ep={ep}"

    far = []  # every score off by more than fp32 noise, listed together
    copies = world // (tp * pp)  # data-parallel copies of the batch (EP spans them)
    for key in EXPERT_KEYS + DENSE_KEYS:
        for layer, (got, exp) in enumerate(zip(stats[key], want_stats[key])):
            if key == "tokens":  # the dispatcher gathers every copy's tokens (experts.py)
                exp = exp * copies
            if exp is None:
                assert got is None, (where, key, layer)
            elif not torch.allclose(got, exp, rtol=1e-7, atol=0):
                rel = ((got - exp).abs() / exp.abs().clamp(min=1e-8)).max().item()
                far.append((key, layer, rel))
    assert not far, (where, far)
    torch.testing.assert_close(stats["layer"], want_stats["layer"], rtol=1e-5, atol=0)
    assert abs(stats["loss"] - want_stats["loss"]) < 1e-5, where
    torch.testing.assert_close(info["layer_scores"], want["layer_scores"], rtol=1e-5, atol=0)

    # the orders: the same wherever the scores they sort are apart
    assert layer_ranking == want_layers, where
    m = moe_config("softmax")
    layer_scores = torch.tensor(want["layer_scores"])
    _same_ranking(layer_scores, list(layer_ranking), list(want_layers), where)
    for layer in range(m.num_layers):
        here = f"{where} layer={layer}"
        reap_total = want_stats["reap_total"][layer]  # the fast mode's expert estimator
        _same_ranking(reap_total, info["expert_order"][layer], want["expert_order"][layer], here)
        for i, (got, exp) in enumerate(  # ranked expert i: the source expert's neurons
            zip(info["expert_neuron_order"][layer], want["expert_neuron_order"][layer])
        ):
            scores = want_stats["expert_neurons"][layer][want["expert_order"][layer][i]]
            _same_ranking(scores, got, exp, f"{here} expert={i}")
        got, exp = info["shared_neuron_order"][layer], want["shared_neuron_order"][layer]
        _same_ranking(want_stats["shared"][layer], got, exp, f"{here} shared")
        heads = want_stats["taylor_token"][layer]  # the fast mode's head estimator
        _same_ranking(heads, info["head_order"][layer], want["head_order"][layer], here)
    identity = list(range(m.num_attention_heads))
    assert any(o != identity for o in want["head_order"])
    assert any(o != list(range(m.num_moe_experts)) for o in want["expert_order"])


def _thorough_body(rank, world_size, ckpt_path, data, out_path):
    from test_importance import SEQ

    from megatron_flextron.importance.moe_ranking import rank_and_permute_moe
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1, seed=1234)
    ckpt = torch.load(ckpt_path, weights_only=False)
    ranked = rank_and_permute_moe(ckpt, data, samples=8, seq_length=SEQ, mode="thorough")
    if rank == 0:
        torch.save(ranked.metadata["importance"], out_path)


def test_thorough_moe_ranking_under_tp2_equals_one_process(reference, tmp_path):
    """The choice among estimators runs sub-networks (fewer experts, narrower experts, fewer
    heads) through the sequence-parallel model: the same held-out losses, choices and orders."""
    tmp, data, _ = reference
    for world in (1, 2):
        out = tmp_path / f"tp{world}.pt"
        run_distributed(_thorough_body, world, str(tmp / "ckpt.pt"), data, str(out))
    one, two = (torch.load(tmp_path / f"tp{w}.pt", weights_only=False) for w in (1, 2))
    for key in ("expert_selection", "head_selection"):
        for name, losses in one[key]["loss"].items():
            for size, loss in losses.items():
                assert abs(two[key]["loss"][name][size] - loss) < 1e-5, (key, name, size)
    assert abs(two["full_loss"] - one["full_loss"]) < 1e-5
    # a choice is compared where the winner's mean loss leads by more than that noise: the
    # experts' always here (the expert scores are far apart too), the heads' when it does
    for key, chosen in (
        ("expert_selection", "expert_estimator"),
        ("head_selection", "head_estimator"),
    ):
        mean = {k: sum(v.values()) / len(v) for k, v in one[key]["loss"].items() if v}
        best, second = sorted(mean.values())[:2]
        assert key == "head_selection" or second - best > 1e-4, (key, mean)
        if second - best > 1e-4:
            assert two[chosen] == one[chosen], chosen
    assert two["expert_order"] == one["expert_order"]
