"""Elastic GPT (one process): equality with megatron's stock dense GPTModel at full size and at
hand-sliced smaller shapes, zero gradients outside the active slice, and spec validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import BATCH, SEQ, batch, elastic_choices, random_canonical_state, tiny_config
from megatron.core.models.gpt import GPTModel
from megatron.core.models.hybrid.hybrid_model import HybridModel

from megatron_flextron.elastic import Subnetwork, build_gpt_model, count_parameters, set_subnetwork
from megatron_flextron.elastic.blocks import hybrid_name
from megatron_flextron.elastic.hybrid import build_hybrid_model
from megatron_flextron.elastic.model import build_heterogeneous_gpt_model

pytestmark = pytest.mark.usefixtures("megatron_single_process")

FAMILIES = {
    "gpt3": tiny_config("gpt3"),
    "llama": tiny_config("llama"),
    "llama_tied": tiny_config("llama", tie_embeddings=True),
}


def _elastic(model_cfg, canonical):
    gpt = build_gpt_model(model_cfg, model_cfg.transformer_config(), elastic=True)
    gpt.load_state_dict(canonical, strict=False)
    return gpt


def _logits(gpt, tokens):
    return gpt(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_equals_stock_gpt(family):
    model_cfg = FAMILIES[family]
    canonical = random_canonical_state(model_cfg)
    stock = build_gpt_model(model_cfg, model_cfg.transformer_config(), elastic=False)
    stock.load_state_dict(canonical, strict=False)
    elastic = _elastic(model_cfg, canonical)
    tokens, _ = batch()
    diff = (_logits(stock, tokens) - _logits(elastic, tokens)).abs().max().item()
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_full_size_equals_stock_models(family):
    """The elastic HybridModel (``*-`` per block) at full size equals megatron's dense GPTModel
    and megatron's HybridModel built from the same local modules, with the same weights."""
    model_cfg = FAMILIES[family]
    canonical = random_canonical_state(model_cfg)
    stock_gpt = build_gpt_model(model_cfg, model_cfg.transformer_config(), elastic=False)
    stock_gpt.load_state_dict(canonical, strict=False)
    tokens, _ = batch()
    reference = _logits(stock_gpt, tokens)
    hybrid = {"*-" * model_cfg.num_layers}
    for elastic in (True, False):
        model = build_hybrid_model(model_cfg, model_cfg.transformer_config(), elastic=elastic)
        assert isinstance(model, HybridModel) and model.hybrid_layer_pattern in hybrid
        missing = model.load_state_dict({hybrid_name(k): v for k, v in canonical.items()}, False)
        assert not [k for k in missing.missing_keys if "_extra_state" not in k]
        diff = (_logits(model, tokens) - reference).abs().max().item()
        assert diff <= 1e-5, (elastic, diff)


# ---------- a stock dense model of a smaller (possibly per-layer) shape, sliced by hand ----------


def _hand_sliced_layer(canonical, model_cfg, src, dst, width, heads):
    """Slice layer ``src`` of the canonical weights to (width, heads) under dense layer ``dst``."""
    g, n, d = model_cfg.num_query_groups, model_cfg.heads_per_group, model_cfg.kv_channels
    h, ffn, blocks = model_cfg.hidden_size, model_cfg.ffn_hidden_size, 2 if model_cfg.gated else 1
    out = {}
    for key, value in canonical.items():
        prefix = f"decoder.layers.{src}."
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("self_attention.linear_qkv."):
            v = value.reshape(g, n + 2, d, -1)
            if model_cfg.is_gqa:  # keep every group: its first heads // g queries, then k and v
                k = heads // g
                v = torch.cat([v[:, :k], v[:, n:]], dim=1)
            else:  # MHA: the first `heads` whole heads
                v = v[:heads]
            value = v.reshape(-1, *value.shape[1:])
        elif name == "self_attention.linear_proj.weight":
            v = value.reshape(h, g, n, d)
            v = v[:, :, : heads // g] if model_cfg.is_gqa else v[:, :heads]
            value = v.reshape(h, -1)
        elif name.startswith("mlp.linear_fc1."):
            value = value.reshape(blocks, ffn, *value.shape[1:])[:, :width].reshape(
                blocks * width, *value.shape[1:]
            )
        elif name == "mlp.linear_fc2.weight":
            value = value[:, :width]
        out[f"decoder.layers.{dst}.{name}"] = value
    return out


def dense_reference(model_cfg, canonical, subnet: Subnetwork) -> GPTModel:
    """Megatron's stock layers, each built at its own size, with hand-sliced weights."""
    shapes = [(subnet.mlp[i], subnet.heads[i]) for i in subnet.layers]
    dense = build_heterogeneous_gpt_model(model_cfg, shapes)
    state = {k: v for k, v in canonical.items() if not k.startswith("decoder.layers.")}
    for dst, src in enumerate(subnet.layers):
        state.update(_hand_sliced_layer(canonical, model_cfg, src, dst, *shapes[dst]))
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)
    return dense


SUBNETS = {
    "homogeneous": lambda m: {"mlp": m.ffn_hidden_size // 2, "heads": m.num_attention_heads // 2},
    "heterogeneous": lambda m: {
        "mlp": [m.ffn_hidden_size // 4, m.ffn_hidden_size, m.ffn_hidden_size // 2, 96],
        "heads": [
            m.num_attention_heads,
            m.num_attention_heads // 2,
            m.num_query_groups,
            m.num_attention_heads // 2,
        ],
    },
    "skip_layers": lambda m: {"mlp": 96, "layers": [0, 2, 3]},
}


@pytest.mark.parametrize("subnet_name", SUBNETS)
@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_subnetwork_equals_hand_sliced_dense_gpt(family, subnet_name):
    model_cfg = FAMILIES[family]
    canonical = random_canonical_state(model_cfg)
    elastic = _elastic(model_cfg, canonical)
    subnet = set_subnetwork(
        elastic, SUBNETS[subnet_name](model_cfg), model_cfg, elastic_choices(model_cfg)
    )
    dense = dense_reference(model_cfg, canonical, subnet)
    dense_params = sum(p.numel() for p in dense.parameters())
    assert count_parameters(subnet, model_cfg)["total"] == dense_params
    tokens, _ = batch()
    full_diff = (
        (_logits(dense, tokens) - _logits(_elastic(model_cfg, canonical), tokens)).abs().max()
    )
    assert full_diff > 1e-2  # the sub-network is a different function from the full model
    diff = (_logits(dense, tokens) - _logits(elastic, tokens)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_gradients_outside_active_slice_are_zero(family):
    model_cfg = FAMILIES[family]
    elastic = _elastic(model_cfg, random_canonical_state(model_cfg))
    spec = {
        "mlp": model_cfg.ffn_hidden_size // 4,
        "heads": model_cfg.num_attention_heads // 2,
        "layers": [0, 1, 3],
    }
    subnet = set_subnetwork(elastic, spec, model_cfg, elastic_choices(model_cfg))
    tokens, labels = batch()
    elastic(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=labels).mean().backward()
    g, n, d = model_cfg.num_query_groups, model_cfg.heads_per_group, model_cfg.kv_channels
    k = subnet.mlp[0]
    for i, layer in enumerate(elastic.decoder.layers):
        grads = {name: p.grad for name, p in layer.named_parameters()}
        if i == 2:  # skipped layer: no gradient at all
            assert all(gr is None or not gr.any() for gr in grads.values())
            continue
        fc1 = grads["mlp.linear_fc1.weight"].reshape(
            2 if model_cfg.gated else 1, -1, model_cfg.hidden_size
        )
        assert fc1[:, :k].abs().sum(-1).gt(0).all() and not fc1[:, k:].any()
        fc2 = grads["mlp.linear_fc2.weight"]
        assert fc2[:, :k].abs().sum(0).gt(0).all() and not fc2[:, k:].any()
        qkv = grads["self_attention.linear_qkv.weight"].reshape(g, n + 2, d, -1)
        proj = grads["self_attention.linear_proj.weight"].reshape(-1, g, n, d)
        if model_cfg.is_gqa:
            kept = subnet.heads[i] // g
            assert qkv[:, :kept].any(-1).all() and qkv[:, n:].any(-1).all()
            assert not qkv[:, kept:n].any() and not proj[:, :, kept:].any()
            assert proj[:, :, :kept].any()
        else:
            kept = subnet.heads[i]
            assert qkv[:kept].any(-1).all() and not qkv[kept:].any() and not proj[:, kept:].any()


def test_sdpa_attention_equals_megatron_local_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_flextron.elastic.sdpa_attention import SDPAttention

    model_cfg = FAMILIES["llama"]
    config = model_cfg.transformer_config()
    torch.manual_seed(0)
    s, b, heads, groups, d = 24, 3, 8, 4, model_cfg.kv_channels
    q = torch.randn(s, b, heads, d)
    k, v = torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    padding = torch.rand(b, 1, s, s) < 0.3
    padding[..., 0] = False  # every query attends to at least one key
    causal = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
    for mask_type, mask in [
        (AttnMaskType.causal, None),
        (AttnMaskType.causal, causal),
        (AttnMaskType.padding, padding),
    ]:
        local = DotProductAttention(config, 1, mask_type, "self")
        sdpa = SDPAttention(config, 1, mask_type, "self")
        diff = (local(q, k, v, mask) - sdpa(q, k, v, mask)).abs().max().item()
        assert diff <= 1e-5, (mask_type, diff)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"mlp": 100}, "layer 0: MLP width 100 is not one of the configured choices"),
        ({"mlp": [128, 128, 64, 40]}, "layer 3: MLP width 40"),
        ({"heads": 6}, "layer 0: head count 6 is not one of the configured choices"),
        ({"heads": [8, 8, 8, 0]}, "values must be positive"),
        ({"mlp": [64, 64]}, "lists 2 values for a 4-layer model"),
        ({"layers": [2, 1]}, "distinct, sorted indices"),
        ({"layers": [0, 4]}, "distinct, sorted indices"),
        ({"width": 3}, "unknown sub-network keys"),
        ("{not json", "not valid JSON"),
    ],
)
def test_invalid_subnetwork_raises_before_any_change(spec, message):
    model_cfg = FAMILIES["llama"]
    elastic = _elastic(model_cfg, random_canonical_state(model_cfg))
    choices = elastic_choices(model_cfg)
    set_subnetwork(elastic, {"mlp": 64}, model_cfg, choices)
    with pytest.raises(ValueError, match=message):
        set_subnetwork(elastic, spec, model_cfg, choices)
    assert all(layer.mlp.active_width == 64 for layer in elastic.decoder.layers)


def test_validation_rules_for_tp_and_head_layout():
    from megatron_flextron.config import ElasticConfig

    gqa, mha = FAMILIES["llama"], FAMILIES["gpt3"]
    loose = ElasticConfig(mlp_choices=range(1, 1000), head_choices=range(1, 64))
    with pytest.raises(ValueError, match="layer 0: MLP width 63 is not divisible by TP size 2"):
        Subnetwork.parse({"mlp": 63}, gqa).validate(gqa, loose, tp_size=2)
    with pytest.raises(
        ValueError, match="layer 0: head count 6 is not a multiple of the 4 KV groups"
    ):
        Subnetwork.parse({"heads": 6}, gqa).validate(gqa, loose, tp_size=1)
    with pytest.raises(
        ValueError, match=r"layer 0: head count 3 is not a multiple of TP size 2 \(MHA\)"
    ):
        Subnetwork.parse({"heads": 3}, mha).validate(mha, loose, tp_size=2)
    Subnetwork.parse({"heads": 3}, mha).validate(mha, loose, tp_size=1)
    with pytest.raises(ValueError, match="does not allow layer skipping"):
        fixed = dataclasses.replace(loose, allow_layer_skipping=False)
        Subnetwork.parse({"layers": [0, 1]}, mha).validate(mha, fixed)


def test_transformer_config_is_architecture_plus_runtime():
    """The stored architecture gives megatron's architecture fields; the runtime (parallel
    layout, precision, device) the rest: only the device decides the post-p2p synchronize."""
    from megatron_flextron.config import Runtime

    m = tiny_config("llama")
    cpu = Runtime(2, 2, torch.bfloat16, device=torch.device("cpu")).transformer_config(m)
    gpu = Runtime(2, 2, torch.bfloat16, device=torch.device("cuda")).transformer_config(m)
    for key, value in m.architecture_kwargs().items():
        assert getattr(cpu, key) == value == getattr(gpu, key), key
    assert (cpu.tensor_model_parallel_size, cpu.pipeline_model_parallel_size) == (2, 2)
    assert cpu.bf16 and not cpu.fp16 and cpu.params_dtype == torch.bfloat16
    assert not cpu.batch_p2p_sync and gpu.batch_p2p_sync
    assert not cpu.bias_activation_fusion and cpu.use_cpu_initialization
    assert m.transformer_config(2, 2, torch.bfloat16).batch_p2p_sync == torch.cuda.is_available()


def test_layers_as_a_count_keep_the_most_important_layers():
    """``"layers": N`` keeps the N most important layers by the checkpoint's layer ranking (what
    importance ranking stores); without a ranking it is refused, naming what to do instead."""
    from megatron_flextron.config import ElasticConfig

    m = FAMILIES["llama"]
    ranked = ElasticConfig((64,), (4,), layer_ranking=(3, 0, 2, 1))
    assert Subnetwork.parse({"layers": 2}, m, ranked).layers == (0, 3)
    assert Subnetwork.parse({"layers": 4}, m, ranked).layers == (0, 1, 2, 3)
    assert ElasticConfig.from_dict(ranked.to_dict()) == ranked
    with pytest.raises(ValueError, match="has none .*--calibration-data"):
        Subnetwork.parse({"layers": 2}, m, ElasticConfig((64,), (4,)))
    with pytest.raises(ValueError, match="a count must be in \\[1, 4\\], got 5"):
        Subnetwork.parse({"layers": 5}, m, ranked)
    with pytest.raises(ValueError, match="list of indices or a count"):
        Subnetwork.parse({"layers": "2"}, m, ranked)
    model = _elastic(m, random_canonical_state(m))
    subnet = set_subnetwork(model, {"layers": 3, "mlp": 64}, m, ranked)
    assert subnet.layers == (0, 2, 3)


def test_hybrid_model_skips_an_attention_or_an_mlp_on_its_own():
    """``skip_attention`` / ``skip_mlp`` drop one half of a layer: the elastic HybridModel then
    equals megatron's HybridModel built without those layers (pattern ``*--**-``), same weights;
    parameters counted alike. The GPTModel (one layer holds both) and the exports refuse it."""
    import dataclasses as dc

    from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
    from megatron_flextron.convert.export import export_subnetwork
    from megatron_flextron.elastic.hybrid import LocalHybridModel, hybrid_stack_spec

    m = FAMILIES["llama"]
    canonical = random_canonical_state(m)
    spec = {"mlp": 64, "skip_attention": [1], "skip_mlp": [2]}
    elastic = build_hybrid_model(m, m.transformer_config(), elastic=True)
    elastic.load_state_dict({hybrid_name(k): v for k, v in canonical.items()}, strict=False)
    subnet = set_subnetwork(elastic, spec, m, elastic_choices(m))
    assert subnet.to_dict() == {**spec, "heads": 8}
    # blocks 0..3 as layers: *- | - (no attention) | * (no MLP) | *-
    where = {(0, "a"): 0, (0, "m"): 1, (1, "m"): 2, (2, "a"): 3, (3, "a"): 4, (3, "m"): 5}
    small = dc.replace(m, ffn_hidden_size=64)
    reference = LocalHybridModel(
        config=small.transformer_config(num_layers=6),
        hybrid_stack_spec=hybrid_stack_spec(small, elastic=False, canonical_layout=False),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        hybrid_layer_pattern="*--**-",
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_base=m.rotary_base,
        rope_scaling_factor=m.rope_scaling_factor,
    )
    state = {}
    sliced = {k: v for k, v in canonical.items() if not k.startswith("decoder.layers.")}
    for layer in range(4):
        sliced.update(_hand_sliced_layer(canonical, m, layer, layer, 64, 8))
    for name, value in sliced.items():
        if not name.startswith("decoder.layers."):
            state[name.replace("final_layernorm", "final_norm")] = value
            continue
        _, _, block, rest = name.split(".", 3)
        half = "a" if rest.startswith(("input_layernorm", "self_attention")) else "m"
        if (int(block), half) in where:
            state[f"decoder.layers.{where[int(block), half]}.{rest}"] = value
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "_extra_state" not in k]
    tokens, _ = batch()
    with torch.no_grad():
        diff = (_logits(elastic, tokens) - _logits(reference, tokens)).abs().max().item()
    assert diff <= 1e-5, diff
    assert count_parameters(subnet, m)["total"] == sum(p.numel() for p in reference.parameters())
    with pytest.raises(ValueError, match="need the elastic HybridModel"):
        set_subnetwork(_elastic(m, canonical), spec, m, elastic_choices(m))
    with pytest.raises(CheckpointError, match="cannot be exported yet"):
        export_subnetwork(Checkpoint(m, canonical), subnet)
    for bad, message in [
        ({"skip_attention": [1], "skip_mlp": [1]}, "skip both their attention and their MLP"),
        ({"layers": [0, 2, 3], "skip_mlp": [1]}, "indices of kept layers"),
        ({"skip_mlp": 2}, "a list of layer indices"),
    ]:
        with pytest.raises(ValueError, match=message):
            set_subnetwork(elastic, bad, m, elastic_choices(m))
