"""Megatron-LM torch_dist checkpoints of mixture-of-experts models (--loader / --saver megatron).

Fixtures are written by megatron-core's own stock models (HybridModel ``*E*E`` and GPTModel with
SequentialMLP experts, random weights) with ``dist_checkpointing.save``: at EP=2 on two gloo
ranks, and at EP=1 in this process; also with megatron's ``singleton_local_shards`` (one key per
expert) and with Transformer Engine's grouped-GEMM names. The loader must read exactly the
stock model's weights, and the elastic model must compute the stock model's logits."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from distributed import run_distributed
from helpers import tiny_config
from test_convert import TOKENS
from test_megatron_dist import megatron_lm_args

from megatron_flextron.checkpoint.flextron import read_flextron
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError, expected_shapes
from megatron_flextron.convert import ConvertOptions, convert, load_checkpoint
from megatron_flextron.convert.formats.megatron_dist import read_common
from megatron_flextron.elastic import build_elastic_model, build_gpt_model
from megatron_flextron.elastic.hybrid import build_hybrid_model, layer_pattern
from megatron_flextron.elastic.tp_layout import gather_canonical, load_canonical_state_dict

pytestmark = pytest.mark.usefixtures("megatron_single_process")
POSITIONS = torch.arange(TOKENS.size(1)).expand_as(TOKENS)
# two routers: softmax top-k renormalized with a gated shared expert (Qwen2-MoE-like), and
# sigmoid with a routing bias and a scaling factor (DeepSeek-V3-like, without groups)
KINDS = {
    "softmax": dict(moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True),
    "sigmoid": dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5,
        moe_shared_expert_intermediate_size=48,
    ),
    "pre_softmax": dict(moe_router_pre_softmax=True),
}


def moe_config(kind: str):
    return tiny_config(
        "llama", num_layers=2, num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2,
        **KINDS[kind],
    )  # fmt: skip


def reference_state(m, seed: int = 0) -> dict:
    """Random canonical weights: norms near 1, the routing bias large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(m).items():
        scale = 0.5 if name.endswith("expert_bias") else 0.05
        base = 1.0 if "norm" in name else 0.0
        state[name] = base + scale * torch.randn(shape, generator=g)
    return state


def moe_args(m, model_class: str = "hybrid", ep: int = 1) -> argparse.Namespace:
    """Megatron-LM's args of a MoE run, training-only MoE arguments included."""
    hybrid = model_class == "hybrid"
    # two pipeline stages in the pattern ("*E|*E"), as a PP=2 run stores it
    extra = dict(hybrid_layer_pattern=layer_pattern(m.num_layers, 2, moe=True)) if hybrid else {}
    return megatron_lm_args(
        num_layers=2 * m.num_layers if hybrid else m.num_layers, hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size, num_attention_heads=m.num_attention_heads,
        kv_channels=m.kv_channels, group_query_attention=True,
        num_query_groups=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
        position_embedding_type="rope", rotary_base=int(m.rotary_base), normalization="RMSNorm",
        norm_epsilon=m.norm_epsilon, swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=not m.tie_embeddings, padded_vocab_size=m.vocab_size,
        tensor_model_parallel_size=1, expert_model_parallel_size=ep,
        num_experts=m.num_moe_experts, moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate, moe_layer_freq=1,
        # training-only: accepted
        moe_router_load_balancing_type=["aux_loss"], moe_aux_loss_coeff=[1e-2],
        moe_z_loss_coeff=1e-3, moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall",
        moe_router_dtype="fp32", moe_router_bias_update_rate=1e-3, moe_expert_capacity_factor=None,
        **extra,
    )  # fmt: skip


def _stock(m, model_class: str, ep: int = 1):
    build = build_hybrid_model if model_class == "hybrid" else build_gpt_model
    config = m.transformer_config(expert_model_parallel_size=ep)
    return build(m, config, elastic=False, pre_process=True, post_process=True)


def grouped_names(sharded: dict, model) -> dict:
    """The experts under Transformer Engine's grouped-GEMM module names, as TEGroupedMLP's
    state dict holds them: ``mlp.experts.linear_fc1.weight{e}``, one whole tensor per expert
    (EP=1: local index = global index); its per-expert ``_extra_state`` objects beside them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    params = dict(model.named_parameters())
    out = {}
    for name, value in sharded.items():
        if ".experts.local_experts." not in name:
            out[name] = value
            continue
        layer, rest = name.split(".mlp.experts.local_experts.")
        expert, module, what = rest.split(".")
        if what == "_extra_state":
            key = f"{layer}.mlp.experts.experts.{module}._extra_state"
            experts = model.config.num_moe_experts
            out[name] = ShardedObject(key, b"", (experts,), (int(expert),))
            continue
        tensor = params[name].detach().clone()
        key = f"{layer}.mlp.experts.{module}.{what}{expert}"
        out[name] = ShardedTensor.from_rank_offsets(key, tensor)
    return out


def write_stock_checkpoint(directory, m, state, model_class="hybrid", layout="megatron", ep=1):
    """Collective: megatron's own model holding ``state`` saved in Megatron-LM's layout
    (iter_0000010/ + tracker). Returns the stock model's gathered canonical weights and its
    logits on TOKENS."""
    from megatron.core import dist_checkpointing

    model = _stock(m, model_class, ep)
    load_canonical_state_dict(model, state, m)
    gathered = gather_canonical(model, m)
    with torch.no_grad():
        logits = model(TOKENS, POSITIONS, None)
    metadata = {"singleton_local_shards": layout == "singleton"}
    sharded = model.sharded_state_dict(metadata=metadata)
    if layout == "grouped":
        sharded = grouped_names(sharded, model)
    folder = os.path.join(directory, "iter_0000010")
    os.makedirs(folder, exist_ok=True)
    args = moe_args(m, model_class, ep)
    dist_checkpointing.save(
        {"model": sharded, "args": args, "checkpoint_version": 3.0, "iteration": 10}, folder
    )
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")
    return gathered, logits


def _ep2_body(rank, world_size, directory, m, state):
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(1, 1, seed=7, expert_model_parallel_size=world_size)
    for layout in ("megatron", "singleton"):
        out = os.path.join(directory, layout)
        gathered, logits = write_stock_checkpoint(out, m, state, layout=layout, ep=world_size)
        if rank == 0:
            torch.save({"gathered": gathered, "logits": logits}, os.path.join(out, "ref.pt"))


def elastic_logits(ckpt: Checkpoint) -> torch.Tensor:
    m = ckpt.model
    model = build_elastic_model(m, m.transformer_config(), pre_process=True, post_process=True)
    load_canonical_state_dict(model, ckpt.state, m)
    with torch.no_grad():
        return model(TOKENS, POSITIONS, None)


def assert_reads(ckpt: Checkpoint, m, gathered: dict, stock_logits: torch.Tensor) -> None:
    assert ckpt.model == m
    assert ckpt.state.keys() == gathered.keys() == expected_shapes(m).keys()
    assert all(torch.equal(ckpt.state[k], v) for k, v in gathered.items())
    assert (elastic_logits(ckpt) - stock_logits).abs().max() <= 1e-5


def test_hybrid_moe_written_at_ep2_reads_exactly(tmp_path):
    """megatron's HybridModel ``*E*E`` at EP=2 (two gloo ranks), sigmoid routing with a routing
    bias and a shared expert: the experts on an axis, and one key per expert."""
    m = moe_config("sigmoid")
    state = reference_state(m)
    run_distributed(_ep2_body, 2, str(tmp_path), m, state)
    for layout in ("megatron", "singleton"):
        ref = torch.load(tmp_path / layout / "ref.pt")
        assert all(torch.equal(ref["gathered"][k], v) for k, v in state.items())
        ckpt = load_checkpoint("megatron", str(tmp_path / layout))
        assert ckpt.metadata["source"]["model_class"] == "HybridModel"
        assert_reads(ckpt, m, ref["gathered"], ref["logits"])


def _tp2_body(rank, world_size, source, directory, m):
    """megatron's own resharding: the EP=1 checkpoint loaded into its TP=2 model, then saved
    again by that model (evaluation mode: megatron's MoE asks for sequence parallelism with TP
    only in training, and sequence parallelism needs fused norms that CPUs lack)."""
    from megatron.core import dist_checkpointing, tensor_parallel

    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1, seed=7)
    config = m.transformer_config(world_size)
    model = build_hybrid_model(m, config, elastic=False, pre_process=True, post_process=True)
    model.eval()
    source = os.path.join(source, "iter_0000010")
    loaded = dist_checkpointing.load(model.sharded_state_dict(), source, strict="raise_all")
    model.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(
            model(TOKENS, POSITIONS, None)
        )
    folder = os.path.join(directory, "iter_0000010")
    os.makedirs(folder, exist_ok=True)
    args = argparse.Namespace(**{**vars(moe_args(m)), "tensor_model_parallel_size": world_size})
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": 10}
    dist_checkpointing.save(state, folder)
    if rank == 0:
        with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("10")
        torch.save(logits, os.path.join(directory, "logits.pt"))


def test_hybrid_moe_written_at_tp2_reads_exactly(tmp_path):
    """A checkpoint megatron's TP=2 HybridModel ``*E*E`` saved (experts split over TP too)
    reads the same tensors as the TP=1 one it came from, and the elastic model computes the
    TP=2 stock model's logits."""
    m = moe_config("softmax")
    state = reference_state(m, seed=3)
    _, logits = write_stock_checkpoint(tmp_path / "tp1", m, state)
    run_distributed(_tp2_body, 2, str(tmp_path / "tp1"), str(tmp_path / "tp2"), m)
    from megatron_flextron.checkpoint.dcp_reader import StoredTensors

    stored = StoredTensors(str(tmp_path / "tp2" / "iter_0000010"))
    fc2 = stored.tensors["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"]
    assert {tuple(c.sizes) for c in fc2.chunks} == {(1, m.hidden_size, m.moe_ffn_hidden_size // 2)}
    ckpt = load_checkpoint("megatron", str(tmp_path / "tp2"))
    tp2_logits = torch.load(tmp_path / "tp2" / "logits.pt")
    assert (tp2_logits - logits).abs().max() <= 1e-5
    assert_reads(ckpt, m, state, tp2_logits)


@pytest.mark.parametrize(
    "kind, model_class, layout",
    [("softmax", "hybrid", "megatron"), ("softmax", "hybrid", "grouped"),
     ("pre_softmax", "gpt", "megatron"), ("sigmoid", "gpt", "singleton")],
)  # fmt: skip
def test_moe_written_at_ep1_reads_exactly(tmp_path, kind, model_class, layout):
    """EP=1 in this process: HybridModel and GPTModel (layers and experts both stacked on
    axes), Transformer Engine's grouped-GEMM names; converted to flextron exactly."""
    m = moe_config(kind)
    state = reference_state(m, seed=1)
    gathered, logits = write_stock_checkpoint(tmp_path, m, state, model_class, layout)
    assert all(torch.equal(gathered[k], v) for k, v in state.items())
    ckpt = load_checkpoint("megatron", str(tmp_path))
    assert ckpt.metadata["source"]["model_class"] == (
        "HybridModel" if model_class == "hybrid" else "GPTModel"
    )
    assert_reads(ckpt, m, gathered, logits)
    convert(ConvertOptions("megatron", "flextron", str(tmp_path), str(tmp_path / "fx")))
    back = read_flextron(str(tmp_path / "fx"))
    assert back.state.keys() == state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in state.items())


@pytest.mark.parametrize("model_class", ["hybrid", "gpt"])
def test_megatron_saver_moe_loads_in_stock_megatron(tmp_path, model_class):
    """The saver's MoE checkpoint: megatron's stock model loads it strictly (every key used)
    and computes the source's logits; the loader reads it back bit for bit."""
    from megatron.core import dist_checkpointing

    from megatron_flextron.convert.formats.megatron import save_megatron

    m = moe_config("sigmoid")
    state = reference_state(m, seed=2)
    os.makedirs(tmp_path / "meg")
    save_megatron(Checkpoint(model=m, state=state), str(tmp_path / "meg"), model_class)
    stock = _stock(m, model_class)
    loaded = dist_checkpointing.load(
        stock.sharded_state_dict(), str(tmp_path / "meg" / "release"), strict="raise_all"
    )
    stock.load_state_dict(loaded, strict=False)
    assert gather_canonical(stock, m).keys() == state.keys()
    assert all(torch.equal(gather_canonical(stock, m)[k], v) for k, v in state.items())
    with torch.no_grad():
        out = stock(TOKENS, POSITIONS, None)
    assert (elastic_logits(Checkpoint(model=m, state=state)) - out).abs().max() <= 1e-5
    flags = (tmp_path / "meg" / "megatron_args.txt").read_text()
    assert "--num-experts 4 " in flags and "--moe-router-enable-expert-bias" in flags
    assert ("--hybrid-layer-pattern *E*E " in flags) == (model_class == "hybrid")
    back = load_checkpoint("megatron", str(tmp_path / "meg"))
    assert back.model == m and back.state.keys() == state.keys()
    assert all(torch.equal(back.state[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hybrid_layer_pattern": "*E*-"}, "layer 3 is '-' \\(MLP\\) where a mixture-of-experts"),
        ({"num_experts": None}, "layer 1 is 'E' \\(mixture-of-experts MLP\\) where a dense"),
        ({"moe_layer_freq": [1, 0]}, "moe_layer_freq=\\[1, 0\\].*dense layers mixed"),
        ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "moe_router_num_groups=2"),
        ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor=1.0"),
        ({"multi_latent_attention": True}, "multi_latent_attention=True"),
        ({"moe_latent_size": 16}, "moe_latent_size=16"),
        ({"moe_router_load_balancing_type": ["sinkhorn"]}, "sinkhorn routing"),
        ({"moe_router_score_function": "sqrtsoftplus"}, "moe_router_score_function='sqrtsof"),
        ({"moe_mlp_glu_interleave_size": 32}, "moe_mlp_glu_interleave_size=32"),
        ({"add_bias_linear": True}, "add_bias_linear=True.*biases in the experts"),
    ],
)
def test_moe_arguments_it_cannot_represent_are_refused(tmp_path, change, message):
    m = moe_config("softmax")
    write_stock_checkpoint(tmp_path / "meg", m, reference_state(m))
    folder = tmp_path / "meg" / "iter_0000010"
    common = read_common(str(folder))
    args = argparse.Namespace(**{**vars(common["args"]), **change})
    torch.save({**common, "args": args}, folder / "common.pt")  # read first (pre-0.19 file)
    with pytest.raises(CheckpointError, match=message):
        convert(ConvertOptions("megatron", "hf", str(tmp_path / "meg"), str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "o")


def test_expert_axis_of_the_wrong_size_is_refused(tmp_path):
    """Stored experts that the args do not account for (4 stored, num_experts=2) are named."""
    m = moe_config("softmax")
    write_stock_checkpoint(tmp_path / "meg", m, reference_state(m))
    folder = tmp_path / "meg" / "iter_0000010"
    common = read_common(str(folder))
    args = argparse.Namespace(**{**vars(common["args"]), "num_experts": 2})
    torch.save({**common, "args": args}, folder / "common.pt")
    with pytest.raises(CheckpointError, match="mlp.experts.experts.linear_fc1.weight: stacked"):
        load_checkpoint("megatron", str(tmp_path / "meg"))


_PARSE = """
import json, sys, typing
typing.override = getattr(typing, "override", lambda f: f)  # Python 3.11: Megatron-LM uses 3.12's
import argparse
from megatron.training.arguments import add_megatron_arguments
parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
args, unknown = parser.parse_known_args(open(sys.argv[1]).read().split())
print(json.dumps({"unknown": unknown, "args": {k: v for k, v in vars(args).items()
                  if k.startswith(("moe_", "num_experts", "hybrid_layer"))}}, default=str))
"""


def test_megatron_args_txt_parses_with_megatron_lm(tmp_path):
    """megatron_args.txt of an MoE model is what Megatron-LM's own parser turns into the args the
    common state holds (every flag known, the same MoE values)."""
    import json
    import subprocess
    import sys

    from megatron_flextron.convert.formats.megatron import save_megatron

    m = moe_config("sigmoid")
    os.makedirs(tmp_path / "meg")
    save_megatron(Checkpoint(model=m, state=reference_state(m)), str(tmp_path / "meg"))
    out = subprocess.run(
        [sys.executable, "-c", _PARSE, str(tmp_path / "meg" / "megatron_args.txt")],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["unknown"] == []
    stored = read_common(str(tmp_path / "meg" / "release"))["args"]
    for key, value in vars(stored).items():
        if key.startswith(("moe_", "num_experts", "hybrid_layer")):
            assert parsed["args"][key] == value, key
