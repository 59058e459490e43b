"""The direct decode step (elastic/decode_step.py) against megatron's path: the same tokens,
log probabilities and top alternatives to the bit, for a batch of requests at full size, at
homogeneous and per-layer sub-networks (fewer heads per KV group, narrower MLPs, skipped
layers), for a Llama (RoPE, RMSNorm, SwiGLU, GQA) and a GPT-3 (learned positions, LayerNorm,
biases, GELU); layers it does not cover run through their modules in the same step; and the
serving layout (column-major row-parallel weights) keeps the weights' values, and every
product to float rounding."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from helpers import IdTokenizer, elastic_choices, random_canonical_state, tiny_config

from megatron_flextron.elastic import build_elastic_model, decode_step, hybrid, set_subnetwork
from megatron_flextron.elastic.linear import ElasticRowParallelLinear, serving_layout
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
from megatron_flextron.inference import ElasticGenerator, Sampling, SubnetworkSelector

pytestmark = pytest.mark.usefixtures("megatron_single_process")

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50,
                                                 51, 52, 53, 54, 55, 56, 57]]  # 2 cache blocks
SPECS = {
    "llama": [None, {"mlp": 64, "heads": 4},
              {"mlp": [128, 64, 32, 64], "heads": [8, 4, 4, 8], "layers": [0, 1, 3]}],
    "gpt3": [None, {"mlp": 64}, {"mlp": [128, 64, 32, 64], "layers": [0, 2, 3]}],
}


def _served(family, tp=1, pp=1, state=None, dtype=torch.float32):
    """A tiny elastic HybridModel as served (this rank's shard of ``state``, default: random
    weights): frozen weights in the serving layout."""
    m = tiny_config(family)
    state = random_canonical_state(m) if state is None else state
    model = build_elastic_model(m, m.transformer_config(tp, pp, params_dtype=dtype)).to(dtype)
    load_canonical_state_dict(model, state, m)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    serving_layout(model)
    selector = SubnetworkSelector(None, m, elastic_choices(m), tp)
    return ElasticGenerator(model, IdTokenizer(), selector, 4, max_sequence_length=48), model


def _generate(generator, specs):
    sampling = Sampling(max_new_tokens=8, top_k=1, logprobs=2)
    results = generator.generate([generator.request(p, sampling, subnetwork=s)
                                  for p in PROMPTS for s in specs])
    return [(r.tokens, r.logprobs, r.top_logprobs) for r in results]


def _count_direct_layers(monkeypatch):
    """Counts the layers run by the direct step (not through their modules)."""
    calls = {"attention": 0, "mlp": 0}
    for cls, kind in ((decode_step._AttentionStep, "attention"), (decode_step._MLPStep, "mlp")):
        inner = cls.__call__

        def counted(self, *a, _inner=inner, _kind=kind):
            calls[_kind] += 1
            return _inner(self, *a)

        monkeypatch.setattr(cls, "__call__", counted)
    return calls


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("gpt3", torch.float32),
                                           ("llama", torch.bfloat16)])
def test_direct_decode_steps_give_megatron_s_tokens_and_log_probabilities(family, dtype,
                                                                          monkeypatch):
    generator, model = _served(family, dtype=dtype)
    calls = _count_direct_layers(monkeypatch)
    direct = _generate(generator, SPECS[family])
    assert calls["attention"] > 0 and calls["mlp"] > 0
    model.decoder.direct_decode = False  # megatron's HybridStack.forward
    count = dict(calls)
    reference = _generate(generator, SPECS[family])
    assert calls == count
    assert direct == reference


def _parallel_body(rank, world_size, states):
    from megatron.core import parallel_state

    from megatron_flextron.parallel import initialize_model_parallel

    for family, tp, pp in (("llama", 2, 1), ("gpt3", 2, 1), ("llama", 1, 2)):
        initialize_model_parallel(tp, pp, seed=1234)
        generator, model = _served(family, tp, pp, states[family])
        calls, inner = [], hybrid.decode_stack

        def counted(*a, _calls=calls, _inner=inner, **k):
            _calls.append(1)
            return _inner(*a, **k)

        hybrid.decode_stack = counted
        try:
            direct = _generate(generator, SPECS[family])
        finally:
            hybrid.decode_stack = inner
        model.decoder.direct_decode = False
        assert calls and _generate(generator, SPECS[family]) == direct, (family, tp, pp)
        parallel_state.destroy_model_parallel()


def test_direct_decode_steps_under_tp2_and_pp2_give_megatron_s_numbers():
    """TP=2 (the projection's and fc2's all-reduce and biases, a rank's KV groups) and PP=2 (a
    stage's layers, the received hidden states): the direct step equals megatron's path to the
    bit."""
    states = {f: random_canonical_state(tiny_config(f)) for f in ("llama", "gpt3")}
    run_distributed(_parallel_body, 2, states)


def test_layers_the_direct_step_does_not_cover_run_through_their_modules(monkeypatch):
    """A layer with a trainable weight (or soft gates, token routing, q/k norms) runs its
    module, between direct layers of the same step: the numbers stay megatron's."""
    generator, model = _served("llama")
    layers = list(model.decoder.layers)
    layers[2].self_attention.linear_qkv.weight.requires_grad_(True)
    layers[5].mlp.linear_fc2.weight.requires_grad_(True)
    through_module = []
    for layer in (layers[2], layers[5]):
        inner = layer._inference_forward

        def spied(*a, _inner=inner, **k):
            through_module.append(1)
            return _inner(*a, **k)

        monkeypatch.setattr(layer, "_inference_forward", spied)
    calls = _count_direct_layers(monkeypatch)
    with torch.no_grad():
        direct = _generate(generator, SPECS["llama"][:2])
    assert through_module and calls["attention"] > 0
    model.decoder.direct_decode = False
    assert _generate(generator, SPECS["llama"][:2]) == direct


def test_steps_other_than_decode_only_cpu_steps_are_not_covered(monkeypatch):
    """Prefill steps run megatron's HybridStack.forward, decode steps the direct step; without
    the CPU shims, or with another paged-attention kernel than the stand-in, every step runs
    megatron's forward (and generates the same tokens)."""
    from megatron.core.transformer import attention as mcore_attention

    from megatron_flextron.compat import inference as inference_shims

    generator, model = _served("llama")
    covered = []
    inner = hybrid.decode_stack
    monkeypatch.setattr(hybrid, "decode_stack",
                        lambda stack, x, context, *a, **k: covered.append(
                            context.is_decode_only()) or inner(stack, x, context, *a, **k))
    request = generator.request(PROMPTS[0], Sampling.greedy(4))
    tokens = generator.generate([request])[0].tokens
    assert covered and all(covered) and len(covered) < 4  # the prefill step is not covered
    covered.clear()
    with monkeypatch.context() as m:
        m.setattr(inference_shims, "active", lambda: False)
        assert generator.generate([request])[0].tokens == tokens and covered == []
    stand_in = mcore_attention.flash_attn_with_kvcache
    with monkeypatch.context() as m:
        m.setattr(mcore_attention, "flash_attn_with_kvcache", lambda *a, **k: stand_in(*a, **k))
        assert generator.generate([request])[0].tokens == tokens and covered == []
    assert generator.generate([request])[0].tokens == tokens and covered


def test_the_serving_layout_keeps_every_row_parallel_product():
    """Column-major row-parallel weights: the same values and shapes, and the same products to
    float rounding (full, an MLP prefix of columns, trimmed GQA heads' column spans) as
    row-major."""
    generator, model = _served("llama")
    rows = [m for m in model.modules() if isinstance(m, ElasticRowParallelLinear)]
    assert rows and all(m.weight.stride() == (1, m.weight.shape[0]) for m in rows)
    m = tiny_config("llama")
    reference = build_elastic_model(m, m.transformer_config())
    load_canonical_state_dict(reference, random_canonical_state(m), m)
    reference.eval()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert a.shape == b.shape and torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    for spec in (None, {"mlp": 64, "heads": 4}):
        set_subnetwork(model, spec, m, elastic_choices(m))
        set_subnetwork(reference, spec, m, elastic_choices(m))
        blocks = [(x.self_attention.linear_proj, y.self_attention.linear_proj)
                  for x, y in zip(model.decoder.layers, reference.decoder.layers)
                  if hasattr(x.self_attention, "linear_proj")]
        blocks += [(x.mlp.linear_fc2, y.mlp.linear_fc2)
                   for x, y in zip(model.decoder.layers, reference.decoder.layers)
                   if hasattr(x.mlp, "linear_fc2")]
        for served, plain in blocks:
            width = plain.weight.shape[1] if plain.active_cols is None else (
                len(range(*plain.active_cols.indices(plain.weight.shape[1])))
                if isinstance(plain.active_cols, slice) else plain.active_cols.numel())
            h = torch.randn(1, 1, width, generator=g)
            with torch.no_grad():
                torch.testing.assert_close(served(h)[0], plain(h)[0], rtol=1e-6, atol=1e-6)
    set_subnetwork(model, None, m, elastic_choices(m))
