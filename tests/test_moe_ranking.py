"""Expert importance (REAP, routing frequency, neurons inside experts), the expert permutation."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from helpers import random_canonical_state, tiny_config

E, TOPK, FFN, SHARED = 8, 2, 16, 24

CONFIGS = {  # Mixtral-style (top-k renormalized) with a gated shared expert; sigmoid + bias
    "softmax": dict(moe_shared_expert_intermediate_size=SHARED, moe_shared_expert_gate=True),
    "sigmoid": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.0,
    ),
}


def moe_config(kind: str):
    return tiny_config(
        "llama",
        num_layers=2,
        num_moe_experts=E,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=TOPK,
        **CONFIGS[kind],
    )


def moe_state(m, seed: int = 0) -> dict:
    """Random canonical weights; experts of unequal scale so that the rankings are far from
    ties; the routing bias too when the config has one."""
    state = random_canonical_state(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}.mlp."
        state[p + "router.weight"] *= 20  # confident, tie-free routing
        for e in range(E):
            scale = 0.5 + 3 * torch.rand((), generator=g)
            for fc in ("linear_fc1", "linear_fc2"):
                state[f"{p}experts.local_experts.{e}.{fc}.weight"] *= scale
        if m.moe_router_enable_expert_bias:
            state[p + "router.expert_bias"] = 0.1 * torch.randn(E, generator=g)
    return state


def calibration(seed: int = 3, padded: bool = True) -> list:
    """Two micro-batches of two sequences of 12 tokens; the first one right-padded."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(2):
        tokens = torch.randint(0, 128, (2, 13), generator=g)
        mask = torch.ones(2, 12)
        if padded and k == 0:
            mask[1, 7:] = 0
        batches.append(
            {"tokens": tokens[:, :-1], "labels": tokens[:, 1:].contiguous(), "loss_mask": mask}
        )
    return batches


def build(m, state, placement="contiguous", **tc):
    from megatron_flextron.elastic import build_elastic_model
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict

    model = build_elastic_model(m, m.transformer_config(**tc), expert_placement=placement)
    load_canonical_state_dict(model, state, m)
    return model.eval()


def logits_of(model, batch) -> torch.Tensor:
    pos = torch.arange(batch["tokens"].shape[1]).expand_as(batch["tokens"])
    with torch.no_grad():
        return model(batch["tokens"], pos, None)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_permutation_preserves_function_and_ranks_experts_first(megatron_single_process, kind):
    from megatron_flextron.importance.expert_permute import permute_moe_state
    from megatron_flextron.importance.experts import collect_expert_statistics

    m = moe_config(kind)
    state = moe_state(m)
    batches = calibration()
    model = build(m, state)
    before = logits_of(model, batches[0])
    stats = collect_expert_statistics(model, batches, m)

    g = torch.Generator().manual_seed(7)  # arbitrary orders first: the function must not move
    orders = dict(
        expert_orders=[torch.randperm(E, generator=g) for _ in range(m.num_layers)],
        neuron_orders=[
            torch.stack([torch.randperm(FFN, generator=g) for _ in range(E)])
            for _ in range(m.num_layers)
        ],
        shared_orders=[torch.randperm(SHARED, generator=g) for _ in range(m.num_layers)]
        if m.moe_shared_expert_intermediate_size
        else None,
    )
    shuffled = dict(permute_moe_state(state, m, **orders))
    assert not torch.equal(
        shuffled["decoder.layers.0.mlp.router.weight"], state["decoder.layers.0.mlp.router.weight"]
    )
    after = logits_of(build(m, shuffled), batches[0])
    assert (after - before).abs().max() < 1e-5

    # ranked by REAP: the same function, and the statistics of the ranked model come out sorted
    reap_orders = [torch.argsort(-s, stable=True) for s in stats["reap"]]
    neuron_orders = [torch.argsort(-s, dim=-1, stable=True) for s in stats["expert_neurons"]]
    ranked = dict(
        permute_moe_state(state, m, expert_orders=reap_orders, neuron_orders=neuron_orders)
    )
    ranked_model = build(m, ranked)
    assert (logits_of(ranked_model, batches[0]) - before).abs().max() < 1e-5
    again = collect_expert_statistics(ranked_model, batches, m)
    for layer in range(m.num_layers):
        reap = again["reap"][layer]
        torch.testing.assert_close(
            reap, stats["reap"][layer][reap_orders[layer]], rtol=1e-5, atol=0
        )
        assert torch.all(reap[:-1] >= reap[1:]) and reap[0] > reap[-1]
        neurons = again["expert_neurons"][layer]
        assert torch.all(neurons[:, :-1] >= neurons[:, 1:])
        assert not torch.equal(reap_orders[layer], torch.arange(E))


def hand_statistics(m, state, batches, layer_inputs) -> dict:
    """REAP, frequency and neuron scores computed from the weights and each MoE layer's input."""
    out = {k: [] for k in ("reap", "frequency", "reap_total", "expert_neurons", "shared")}
    for layer in range(m.num_layers):
        p = f"decoder.layers.{layer}.mlp."
        count = torch.zeros(E, dtype=torch.float64)
        reap = torch.zeros(E, dtype=torch.float64)
        neurons = torch.zeros(E, FFN, dtype=torch.float64)
        shared_sq = torch.zeros(m.moe_shared_expert_intermediate_size or 1, dtype=torch.float64)
        for batch, x in zip(batches, layer_inputs[layer]):
            mask = batch["loss_mask"]
            x = x.double()  # [s, b, h]
            logits = x @ state[p + "router.weight"].double().t()  # [s, b, E]
            if m.moe_router_score_function == "sigmoid":
                scores = torch.sigmoid(logits)
                top = torch.topk(scores + state[p + "router.expert_bias"].double(), TOPK).indices
                weights = scores.gather(-1, top)
                weights = weights / weights.sum(-1, keepdim=True)
            else:  # Mixtral: softmax over the top-k logits
                values, top = torch.topk(logits, TOPK)
                weights = torch.softmax(values, -1)
            weights = weights * (m.moe_router_topk_scaling_factor or 1.0)
            for s in range(x.shape[0]):
                for b in range(x.shape[1]):
                    if mask[b, s] == 0:
                        continue
                    for k in range(TOPK):
                        e, w = int(top[s, b, k]), weights[s, b, k]
                        fc1 = state[f"{p}experts.local_experts.{e}.linear_fc1.weight"].double()
                        fc2 = state[f"{p}experts.local_experts.{e}.linear_fc2.weight"].double()
                        gate, up = (fc1 @ x[s, b]).chunk(2)
                        act = F.silu(gate) * up
                        count[e] += 1
                        reap[e] += w * (fc2 @ act).norm()
                        neurons[e] += (w * act).abs()
            if m.moe_shared_expert_intermediate_size:
                fc1 = state[p + "shared_experts.linear_fc1.weight"].double()
                gate, up = (x @ fc1.t()).chunk(2, dim=-1)
                act = (F.silu(gate) * up).abs()  # [s, b, Fs]
                valid = mask.t().unsqueeze(-1).double()
                shared_sq += ((act * valid).sum(0) / valid.sum(0)).pow(2).sum(0)
        out["reap"].append(reap / count.clamp(min=1))
        out["frequency"].append(count / count.sum())
        out["reap_total"].append(reap / count.sum())
        out["expert_neurons"].append(neurons / count.clamp(min=1).unsqueeze(-1))
        out["shared"].append(shared_sq.sqrt() if m.moe_shared_expert_intermediate_size else None)
    return out


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_reap_statistics_equal_hand_computation(megatron_single_process, kind):
    from megatron_flextron.importance.experts import collect_expert_statistics, moe_layers

    m = moe_config(kind)
    state = moe_state(m)
    batches = calibration()
    model = build(m, state)
    inputs = {i: [] for i in range(m.num_layers)}
    handles = [
        layer.register_forward_pre_hook(
            lambda mod, args, i=block.index: inputs[i].append(args[0].detach())
        )
        for block, layer in moe_layers(model)
    ]
    try:
        stats = collect_expert_statistics(model, batches, m)
    finally:
        for h in handles:
            h.remove()
    expected = hand_statistics(m, state, batches, inputs)
    tokens = sum(b["loss_mask"].sum() for b in batches)
    for layer in range(m.num_layers):
        assert stats["tokens"][layer].sum() == TOPK * tokens  # padding left out
        for key in ("reap", "frequency", "reap_total", "expert_neurons", "shared"):
            if expected[key][layer] is None:
                assert stats[key][layer] is None
                continue
            torch.testing.assert_close(
                stats[key][layer], expected[key][layer], rtol=1e-5, atol=1e-7
            )
        assert (stats["frequency"][layer] > 0).sum() >= TOPK + 1  # not a degenerate routing


def _ep_body(rank, world_size, reference_path, kind):
    from megatron_flextron.importance.experts import collect_expert_statistics
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=1234, expert_model_parallel_size=2)
    m = moe_config(kind)
    saved = torch.load(reference_path)  # the canonical state and the EP=1 statistics
    reference = saved["stats"]
    for placement in ("contiguous", "balanced"):  # statistics keyed by the ranked expert
        model = build(m, saved["state"], placement, expert_model_parallel_size=2)
        assert len(model.decoder.layers[1].mlp.experts.local_experts) == E // 2
        stats = collect_expert_statistics(model, calibration(), m)
        for key in ("reap", "frequency", "reap_total", "expert_neurons", "shared"):
            for got, want in zip(stats[key], reference[key]):
                if want is None:
                    assert got is None
                else:  # fp32 noise
                    torch.testing.assert_close(
                        got, want, rtol=1e-5, atol=1e-8, msg=lambda e, p=placement: f"{p}: {e}"
                    )


def test_expert_statistics_under_ep2_equal_ep1(megatron_single_process, tmp_path):
    from megatron_flextron.importance.experts import collect_expert_statistics

    kind = "softmax"
    m = moe_config(kind)
    state = moe_state(m)  # all experts: built at EP=1
    reference = collect_expert_statistics(build(m, state), calibration(), m)
    path = tmp_path / "ep1.pt"
    torch.save({"state": state, "stats": reference}, path)
    run_distributed(_ep_body, 2, str(path), kind)


def test_rank_and_permute_and_the_converter_rank_an_moe_checkpoint(
    megatron_single_process, tmp_path
):
    """The converter's entry point: heads, layers, experts and expert neurons come out ranked
    in one pass, the function unchanged, and the metadata says how."""
    from helpers import elastic_choices
    from test_importance import SEQ, _calibration_file

    from megatron_flextron.checkpoint.flextron import read_flextron, save_flextron
    from megatron_flextron.checkpoint.state import Checkpoint
    from megatron_flextron.convert import ConvertOptions, convert
    from megatron_flextron.importance import rank_and_permute
    from megatron_flextron.importance.expert_permute import permute_moe_state
    from megatron_flextron.importance.moe_ranking import rank_and_permute_moe
    from megatron_flextron.importance.permute import permute_state

    m = moe_config("softmax")
    state = moe_state(m)
    ckpt = Checkpoint(model=m, state=state, elastic=elastic_choices(m))
    data = _calibration_file(tmp_path / "calib.jsonl")
    ranked = rank_and_permute(ckpt, data, samples=16, seq_length=SEQ, mode="thorough")
    info = ranked.metadata["importance"]
    losses = info["expert_selection"]["loss"]
    assert info["expert_selection"]["experts"] == [6, 4, 2]  # the configured reduced counts
    mean = {k: sum(v.values()) / len(v) for k, v in losses.items()}
    assert set(mean) == {"original", "frequency", "reap", "reap_total"}
    assert info["expert_estimator"] == min(mean, key=mean.get)
    assert (
        info["expert_order"] == info["expert_selection"]["expert_order"][info["expert_estimator"]]
    )
    assert info["expert_neuron_estimator"] in ("original", "activation")
    assert info["expert_neuron_selection"]["moe_ffn"] == FFN // 2
    # heads: the dense path's choice (every candidate scored at every reduced head count)
    head_losses = info["head_selection"]["loss"]
    assert set(head_losses) == {"original", "activation", "taylor", "taylor_token"}
    assert all(list(v) == info["head_selection"]["heads"] for v in head_losses.values())
    assert info["head_estimator"] in head_losses
    assert any(h != list(range(m.num_attention_heads)) for h in info["head_order"])
    scores = info["layer_scores"]
    assert ranked.elastic.layer_ranking == tuple(
        sorted(range(m.num_layers), key=lambda i: -scores[i])
    )

    # the state is the source permuted by the recorded orders, and computes the same function
    orders = [torch.tensor(o) for o in info["expert_order"]]
    neurons = [torch.tensor(n) for n in info["expert_neuron_order"]]  # by ranked position
    by_source = [torch.empty_like(n) for n in neurons]
    for layer in range(m.num_layers):
        by_source[layer][orders[layer]] = neurons[layer]
    shared = [torch.tensor(s) for s in info["shared_neuron_order"]]
    heads = [torch.tensor(o) for o in info["head_order"]]
    expected = permute_state(permute_moe_state(state, m, orders, by_source, shared), m, None, heads)
    for name in state:
        assert torch.equal(ranked.state[name], expected[name]), name
    batch = calibration()[1]
    before = logits_of(build(m, state), batch)
    assert (logits_of(build(m, dict(ranked.state)), batch) - before).abs().max() < 1e-5
    # the converter (flextron -> flextron with calibration data) writes the same ranking
    os.makedirs(tmp_path / "src")
    save_flextron(ckpt, str(tmp_path / "src"))
    ranking = dict(samples=16, seq_length=SEQ, mode="thorough")
    options = ConvertOptions("flextron", "flextron", str(tmp_path / "src"), str(tmp_path / "out"))
    convert(dataclasses.replace(options, calibration_data=data, ranking=ranking))
    written = read_flextron(str(tmp_path / "out"))
    assert written.metadata["importance"]["expert_order"] == info["expert_order"]
    assert written.elastic.expert_choices == ckpt.elastic.expert_choices
    for name in state:
        assert torch.equal(written.state[name], ranked.state[name]), name
    # fast mode: one statistics pass over every sequence, REAP x frequency and activation
    fast = rank_and_permute_moe(ckpt, data, samples=16, seq_length=SEQ, mode="fast")
    fast_info = fast.metadata["importance"]
    assert fast_info["calibration_sequences"] == 16 and fast_info["heldout_sequences"] == 0
    assert (fast_info["expert_estimator"], fast_info["expert_neuron_estimator"]) == (
        "reap_total",
        "activation",
    )
    assert fast_info["expert_order"] == fast_info["expert_selection"]["expert_order"]["reap_total"]
    assert fast_info["head_estimator"] == "taylor_token"
    assert fast_info["head_order"] == fast_info["head_selection"]["head_order"]["taylor_token"]
    with pytest.raises(ValueError, match="unknown head estimator 'norm'"):
        rank_and_permute(ckpt, data, samples=16, seq_length=SEQ, head_estimator="norm")


def _head_scaled(m, state, seed: int = 5, dead: bool = False) -> dict:
    """Heads of unequal weight (output-projection columns scaled per head: rankings far from
    ties); with ``dead``, the first head of every KV group has a zero output projection."""
    g = torch.Generator().manual_seed(seed)
    state = dict(state)
    d, n = m.kv_channels, m.num_attention_heads // m.num_query_groups
    for layer in range(m.num_layers):
        name = f"decoder.layers.{layer}.self_attention.linear_proj.weight"
        scale = 0.5 + 4 * torch.rand(m.num_attention_heads, generator=g)
        if dead:
            scale[::n] = 0
        w = state[name]
        state[name] = (w.reshape(w.shape[0], -1, d) * scale[None, :, None]).reshape(w.shape)
    return state


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_head_and_expert_permutations_together_preserve_an_moe(megatron_single_process, kind):
    from megatron_flextron.importance.expert_permute import permute_moe_state
    from megatron_flextron.importance.permute import permute_state

    m = moe_config(kind)
    state = moe_state(m)
    batch = calibration()[0]
    before = logits_of(build(m, state), batch)
    g = torch.Generator().manual_seed(11)
    n, groups = m.num_attention_heads // m.num_query_groups, m.num_query_groups
    heads = [  # inside each KV group, as the ranking permutes them
        torch.cat([j * n + torch.randperm(n, generator=g) for j in range(groups)])
        for _ in range(m.num_layers)
    ]
    experts = [torch.randperm(E, generator=g) for _ in range(m.num_layers)]
    both = dict(permute_state(permute_moe_state(state, m, experts), m, head_orders=heads))
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.equal(both[name], state[name])
    assert (logits_of(build(m, both), batch) - before).abs().max() < 1e-5


def test_dead_heads_rank_last_and_half_the_heads_keep_the_function(
    megatron_single_process, tmp_path
):
    """A constructed case where the ranking is unambiguous: the first head of every KV group
    adds nothing (zero output projection). Ranked, the half-heads sub-network is the full
    model's function; in source order it keeps only the dead heads."""
    from helpers import elastic_choices
    from test_importance import SEQ, _calibration_file

    from megatron_flextron.checkpoint.state import Checkpoint
    from megatron_flextron.elastic import set_subnetwork
    from megatron_flextron.importance.moe_ranking import rank_and_permute_moe

    m = moe_config("softmax")
    state = _head_scaled(m, moe_state(m), dead=True)
    ckpt = Checkpoint(model=m, state=state, elastic=elastic_choices(m))
    data = _calibration_file(tmp_path / "calib.jsonl")
    ranked = rank_and_permute_moe(ckpt, data, samples=8, seq_length=SEQ, mode="fast")
    n = m.num_attention_heads // m.num_query_groups
    for order in ranked.metadata["importance"]["head_order"]:
        assert all(h % n != 0 for h in order[::n])  # a live head leads every group

    half = {"heads": m.num_attention_heads // 2}
    batch = calibration()[1]

    def at_half(s):
        model = build(m, s)
        set_subnetwork(model, half, m, ckpt.elastic)
        return logits_of(model, batch)

    full = logits_of(build(m, state), batch)
    assert (at_half(dict(ranked.state)) - full).abs().max() < 1e-5
    assert (at_half(state) - full).abs().max() > 1e-2


def _ep_ranking_body(rank, world_size, ckpt_path, data, out_path):
    from test_importance import SEQ

    from megatron_flextron.importance.moe_ranking import rank_and_permute_moe
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=1234, expert_model_parallel_size=2)
    ckpt = torch.load(ckpt_path, weights_only=False)
    ranked = rank_and_permute_moe(ckpt, data, samples=8, seq_length=SEQ, mode="fast")
    if rank == 0:
        torch.save((ranked.metadata["importance"], ranked.elastic.layer_ranking), out_path)


def test_head_and_layer_ranking_under_ep2_equals_ep1(megatron_single_process, tmp_path):
    """Heads, layers and experts ranked by 2 EP ranks (each holding half the experts) as by
    one process (TP and PP: test_moe_ranking_parallel.py)."""
    from helpers import elastic_choices
    from test_importance import SEQ, _calibration_file

    from megatron_flextron.checkpoint.state import Checkpoint
    from megatron_flextron.importance.moe_ranking import rank_and_permute_moe

    m = moe_config("softmax")
    ckpt = Checkpoint(model=m, state=_head_scaled(m, moe_state(m)), elastic=elastic_choices(m))
    data = _calibration_file(tmp_path / "calib.jsonl")
    one = rank_and_permute_moe(ckpt, data, samples=8, seq_length=SEQ, mode="fast")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    run_distributed(_ep_ranking_body, 2, str(tmp_path / "ckpt.pt"), data, str(tmp_path / "ep2.pt"))
    info, layer_ranking = torch.load(tmp_path / "ep2.pt", weights_only=False)
    want = one.metadata["importance"]
    assert layer_ranking == one.elastic.layer_ranking
    torch.testing.assert_close(info["layer_scores"], want["layer_scores"], rtol=1e-5, atol=0)
    assert info["head_selection"]["head_order"] == want["head_selection"]["head_order"]
    assert info["head_order"] == want["head_order"]
    assert info["expert_order"] == want["expert_order"]
    identity = list(range(m.num_attention_heads))
    assert any(o != identity for o in want["head_selection"]["head_order"]["taylor_token"])
