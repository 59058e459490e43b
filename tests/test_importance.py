"""Importance ranking: estimators equal an independent computation of their formulas, iterative
refinement keeps larger sub-networks, and ranking sharded over TP/PP equals the single process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from distributed import run_distributed
from helpers import tiny_config

from megatron_flextron.checkpoint.state import Checkpoint
from megatron_flextron.config import ElasticConfig

pytestmark = pytest.mark.usefixtures("megatron_single_process")
SEQ = 24


def _tiny_checkpoint(family="llama", seed=0) -> Checkpoint:
    """A random tiny model whose units matter unequally (scaled heads and neurons)."""
    from helpers import random_canonical_state

    m = tiny_config(family, num_attention_heads=12)  # GQA: 4 KV groups of 3 heads
    state = random_canonical_state(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    d = m.kv_channels
    for layer in range(m.num_layers):
        p = f"decoder.layers.{layer}."
        w = state[p + "self_attention.linear_proj.weight"]
        scale = torch.rand(m.num_attention_heads, generator=g) * 8
        state[p + "self_attention.linear_proj.weight"] = (
            w.reshape(w.shape[0], -1, d) * scale[None, :, None]
        ).reshape(w.shape)
        fc2 = state[p + "mlp.linear_fc2.weight"]
        state[p + "mlp.linear_fc2.weight"] = fc2 * torch.rand(fc2.shape[1], generator=g) * 8
    return Checkpoint(
        model=m,
        state=state,
        tokenizer_dir=None,
        elastic=ElasticConfig.from_ratios(m, head_ratios=(1.0, 2 / 3, 1 / 3)),
        metadata={},
    )


def _calibration_file(path, vocab=128, n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(torch.randint(0, vocab, (SEQ + 1,), generator=g).tolist()) + "\n")
    return str(path)


def _exact_taylor(model, batches, m):
    """Per head and sequence (or token), d L / d eps where the head's input to the output
    projection is scaled by (1 + eps): the first-order terms computed by autograd on eps."""
    from megatron_flextron.elastic.blocks import transformer_blocks
    from megatron_flextron.lm_step import position_ids

    layers = transformer_blocks(model)
    heads, d = m.num_attention_heads, m.kv_channels
    per_seq = [torch.zeros(heads, dtype=torch.float64) for _ in layers]
    per_tok = [torch.zeros(heads, dtype=torch.float64) for _ in layers]
    for batch in batches:
        b, s = batch["tokens"].shape
        eps = [torch.zeros(s, b, heads, requires_grad=True) for _ in layers]

        def scale(i, s=s, b=b, eps=eps):  # bound now: the hooks run in this iteration only
            def hook(module, args):
                a = args[0].reshape(s, b, heads, d) * (1 + eps[i]).unsqueeze(-1)
                return (a.reshape(s, b, heads * d),)

            return hook

        handles = [
            layer.self_attention.linear_proj.register_forward_pre_hook(scale(i))
            for i, layer in enumerate(layers)
        ]
        try:
            out = model(batch["tokens"], position_ids(batch), None, labels=batch["labels"])
        finally:
            for h in handles:
                h.remove()
        mask = batch["loss_mask"]
        loss = (out * mask).sum() / mask.sum()
        grads = torch.autograd.grad(loss, eps)
        for i, g in enumerate(grads):  # [s, b, H]; masked positions have no loss term
            per_seq[i] += g.double().sum(0).abs().sum(0)
            per_tok[i] += g.double().abs().sum((0, 1))
    return per_seq, per_tok


def test_taylor_estimators_equal_their_formulas():
    from megatron_flextron.importance import ranking_model
    from megatron_flextron.importance.collect import collect_statistics
    from megatron_flextron.lm_step import pad_microbatches

    ckpt = _tiny_checkpoint()
    m = ckpt.model
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 128, (SEQ + 1 - i,), generator=g).tolist() for i in range(6)]
    batches = pad_microbatches(seqs, 4)  # ragged: padding and a fully masked row
    model = ranking_model(ckpt)
    stats = collect_statistics(model, batches, m, with_taylor=True)
    per_seq, per_tok = _exact_taylor(model, batches, m)
    for i in range(m.num_layers):
        torch.testing.assert_close(stats["taylor"][i], per_seq[i], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(stats["taylor_token"][i], per_tok[i], rtol=1e-4, atol=1e-9)
        assert (per_tok[i] >= per_seq[i] - 1e-9).all()  # |sum| <= sum |.|
    assert not torch.allclose(stats["taylor"][0], stats["taylor_token"][0], rtol=1e-2)


def test_reorder_kept_heads():
    from megatron_flextron.importance.refine import reorder_kept

    order = torch.tensor([2, 0, 1, 4, 5, 3])  # 2 KV groups of 3 heads
    # 4 kept heads (2 per group) scored again: the second of group 0, the first of group 1 win
    out = reorder_kept(order, torch.tensor([0.1, 0.9, 0.8, 0.2]), 4, groups=2)
    assert out.tolist() == [0, 2, 1, 4, 5, 3]
    mha = reorder_kept(torch.tensor([3, 1, 0, 2]), torch.tensor([0.0, 1.0]), 2, groups=4)
    assert mha.tolist() == [1, 3, 0, 2]


def test_fast_mode_ranks_from_one_statistics_pass(tmp_path):
    """The default (fast) mode: every calibration sequence feeds one statistics pass, heads by
    per-token Taylor, neurons by activation, no held-out choice and no refinement; the orders
    equal those of an independent statistics pass."""
    from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
    from megatron_flextron.importance import held_out_loss, rank_and_permute, ranking_model
    from megatron_flextron.importance.collect import collect_statistics
    from megatron_flextron.importance.order import head_order, neuron_order
    from megatron_flextron.importance.permute import permute_state
    from megatron_flextron.lm_step import pad_microbatches

    data = _calibration_file(tmp_path / "calib.jsonl")
    ckpt = _tiny_checkpoint()
    m = ckpt.model
    ranked = rank_and_permute(ckpt, data, samples=16, seq_length=SEQ)
    info = ranked.metadata["importance"]
    assert (info["mode"], info["head_estimator"], info["mlp_estimator"]) == (
        "fast", "taylor_token", "activation",
    )  # fmt: skip
    assert (info["calibration_sequences"], info["heldout_sequences"]) == (16, 0)
    assert info["head_refinement"] is None and info["head_selection"]["loss"] == {}
    # the cheap path ran: statistics, no selection or refinement stage
    assert set(info["cpu_seconds"]) == {"tokenize", "load model", "statistics", "permute", "total"}

    seqs = [json.loads(line) for line in open(data)]
    model = ranking_model(ckpt)
    stats = collect_statistics(model, pad_microbatches(seqs, 4), m, with_taylor=True)
    heads = [head_order(s, m.num_query_groups).tolist() for s in stats["taylor_token"]]
    mlp = [neuron_order(s).tolist() for s in stats["mlp"]]
    assert info["head_order"] == heads and info["mlp_order"] == mlp
    assert heads != [list(range(12))] * m.num_layers
    assert abs(info["calibration_loss"] - stats["loss"]) < 1e-5

    # the ranked checkpoint is the source permuted by these orders (function-preserving)
    expected = permute_state(
        ckpt.state,
        m,
        head_orders=[torch.tensor(h) for h in heads],
        mlp_orders=[torch.tensor(o) for o in mlp],
    )
    assert all(torch.equal(ranked.state[k], expected[k]) for k in ckpt.state)
    batches = pad_microbatches(seqs, 4)
    load_canonical_state_dict(model, ranked.state, m)
    assert abs(held_out_loss(model, batches) - stats["loss"]) < 1e-5


def _rank(ckpt, data, estimator):
    from megatron_flextron.importance import rank_and_permute

    return rank_and_permute(
        ckpt, data, samples=16, seq_length=SEQ, head_estimator=estimator, mode="thorough"
    )


def _compare(ranked, ref_state, ref_info, ref_stats, stats):
    info = ranked.metadata["importance"]
    for key in ("mlp_order", "head_order", "head_estimator", "mlp_estimator"):
        assert info[key] == ref_info[key], key
    assert info["head_refinement"]["kept"] == ref_info["head_refinement"]["kept"]
    assert all(torch.equal(ranked.state[k], ref_state[k]) for k in ref_state)
    for key in ("mlp", "activation", "taylor", "taylor_token"):
        for a, b in zip(stats[key], ref_stats[key]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for name, losses in ref_info["head_selection"]["loss"].items():
        for h, loss in losses.items():
            assert abs(info["head_selection"]["loss"][name][h] - loss) < 1e-4


def _sharded_body(rank, world_size, data, ref_state, ref_info, ref_stats, save_dir, ref_dir):
    from megatron.core import parallel_state

    from megatron_flextron.checkpoint.flextron import read_flextron
    from megatron_flextron.convert import _save_distributed
    from megatron_flextron.importance import ranking_model
    from megatron_flextron.importance.collect import collect_statistics
    from megatron_flextron.lm_step import pad_microbatches
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1)
    ckpt = _tiny_checkpoint()
    parallel_state.destroy_model_parallel()
    seqs = [json.loads(line) for line in open(data)]
    batches = pad_microbatches(seqs[4:], 4)
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        initialize_model_parallel(tp, pp)
        stats = collect_statistics(ranking_model(ckpt), batches, ckpt.model, with_taylor=True)
        ranked = _rank(ckpt, data, "taylor")
        _compare(ranked, ref_state, ref_info, ref_stats, stats)
        if (tp, pp) == (2, 2):  # every rank writes its shard; the checkpoint equals TP=1's
            out = os.path.join(save_dir, "tp2pp2")
            _save_distributed(ranked, out)
            a, b = read_flextron(out), read_flextron(ref_dir)
            assert a.metadata["importance"]["head_order"] == ref_info["head_order"]
            assert set(a.state) == set(b.state)
            assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        parallel_state.destroy_model_parallel()


def test_ranking_sharded_over_tp_and_pp_equals_single_process(tmp_path):
    from megatron_flextron.checkpoint.flextron import save_flextron
    from megatron_flextron.importance import ranking_model
    from megatron_flextron.importance.collect import collect_statistics
    from megatron_flextron.lm_step import pad_microbatches

    data = _calibration_file(tmp_path / "calib.jsonl")
    ckpt = _tiny_checkpoint()
    ranked = _rank(ckpt, data, "taylor")
    info = ranked.metadata["importance"]
    # the source order is not the answer, so equal orders below are not trivial
    assert info["head_order"] != [list(range(12))] * 4
    # the layer ranking a sub-network's layer count uses: by score, largest first
    scores = info["layer_scores"]
    ranking = ranked.elastic.layer_ranking
    assert sorted(ranking) == list(range(4))
    assert all(scores[a] >= scores[b] for a, b in zip(ranking, ranking[1:]))
    seqs = [json.loads(line) for line in open(data)]
    stats = collect_statistics(
        ranking_model(ckpt), pad_microbatches(seqs[4:], 4), ckpt.model, with_taylor=True
    )
    os.makedirs(tmp_path / "ref")
    save_flextron(ranked, str(tmp_path / "ref"))
    run_distributed(
        _sharded_body,
        4,
        data,
        dict(ranked.state),  # read: a lazy state is not sent to other processes
        info,
        stats,
        str(tmp_path),
        str(tmp_path / "ref"),
    )


def test_convert_cli_under_torchrun_equals_single_process(tmp_path):
    """tools/convert_checkpoint.py on 2 processes (TP=2) writes the single-process checkpoint."""
    import subprocess
    import sys

    from megatron_flextron.checkpoint.flextron import read_flextron, save_flextron
    from megatron_flextron.convert import ConvertOptions, convert

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = _calibration_file(tmp_path / "calib.jsonl")
    os.makedirs(tmp_path / "src")
    save_flextron(_tiny_checkpoint(), str(tmp_path / "src"))
    ranking = dict(samples=16, seq_length=SEQ, head_estimator="taylor")
    convert(
        ConvertOptions(
            "flextron", "flextron", str(tmp_path / "src"), str(tmp_path / "one"),
            calibration_data=data, ranking=ranking,
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    common = [
        os.path.join(root, "tools", "convert_checkpoint.py"),
        "--loader", "flextron", "--saver", "flextron", "--load-dir", str(tmp_path / "src"),
        "--calibration-data", data, "--calibration-samples", "16",
        "--calibration-seq-length", str(SEQ), "--head-estimator", "taylor",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    out = subprocess.run(
        torchrun + ["--nproc-per-node=2"] + common
        + ["--save-dir", str(tmp_path / "two"), "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = read_flextron(str(tmp_path / "one")), read_flextron(str(tmp_path / "two"))
    assert a.metadata["importance"]["head_order"] == b.metadata["importance"]["head_order"]
    assert a.metadata["importance"]["mlp_order"] == b.metadata["importance"]["mlp_order"]
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    # 2 processes cannot hold TP=2 x PP=2: one line on stderr, exit 2, nothing written
    bad = subprocess.run(
        torchrun + ["--nproc-per-node=2"] + common + ["--save-dir", str(tmp_path / "bad"),
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert bad.returncode != 0 and "do not hold TP=2 x PP=2" in bad.stderr, bad.stderr[-3000:]
    assert not os.path.exists(tmp_path / "bad")
