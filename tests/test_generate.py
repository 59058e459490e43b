"""Generation on megatron-core's dynamic inference engine: the decode-step mask, paged-KV-cache
decoding against full recomputation, continuous batching and per-request seeds, SmolLM2's greedy
output against transformers', TP/PP against one process, the generate tool, and the MHA
refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from distributed import run_distributed
from helpers import IdTokenizer, elastic_choices, random_canonical_state, tiny_config
from serving_helpers import (
    HOMOGENEOUS,
    PER_LAYER,
    PROMPTS,
    hf_greedy,
    hf_model,
    smollm2_flextron,
)

from megatron_flextron.elastic import build_gpt_model, set_subnetwork
from megatron_flextron.elastic.blocks import transformer_blocks
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
from megatron_flextron.inference import ElasticGenerator, Sampling, SubnetworkSelector

pytestmark = pytest.mark.usefixtures("megatron_single_process")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 24


def test_the_inference_internals_this_project_relies_on_are_there():
    """What engine.py and compat/inference.py use where megatron has no public API (one line
    naming the internal when a release changes it)."""
    import inspect

    from megatron.core.inference.contexts import dynamic_context
    from megatron.core.inference.engines import dynamic_engine
    from megatron.core.inference.text_generation_controllers import text_generation_controller
    from megatron.core.transformer import attention

    controller = text_generation_controller.TextGenerationController
    sampler = inspect.getsource(controller._dynamic_step_sample_logits)
    context_init = inspect.getsource(dynamic_context.DynamicInferenceContext)
    engine = inspect.getsource(dynamic_engine.DynamicInferenceEngine)
    needs = {
        "engine.py SamplingController: the per-step sampling hook and its buffers":
            all(n in sampler for n in ("_all_logits_cuda", "_sampled_tokens_cuda")),
        "engine.py: a context's request_ids / paused_request_count / total_request_count":
            all(n in context_init for n in ("self.request_ids", "self.paused_request_count",
                                            "self.total_request_count")),
        "engine.py: finishing a request through stop_word_finished_request_ids, .requests":
            all(n in engine for n in ("self.stop_word_finished_request_ids", "self.requests")),
        "compat/inference.py: attention's flash-attn names":
            all(hasattr(attention, n) for n in ("flash_attn_varlen_func",
                                                "flash_attn_with_kvcache", "is_fa_min_version")),
        "compat/inference.py: the Triton KV append switch, the controller's nvtx names":
            hasattr(dynamic_context, "triton_append_key_value_cache")
            and hasattr(text_generation_controller, "range_push"),
    }
    assert [k for k, ok in needs.items() if not ok] == []


def test_one_query_against_a_longer_cache_attends_to_every_cached_key():
    """SDPA's is_causal=True with 1 query and 6 keys lets the query see only the first key
    (top-left alignment); the decode step must see all of them, like the last row of full
    causal attention."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_flextron.elastic.sdpa_attention import SDPAttention

    m = tiny_config("llama")
    attention = SDPAttention(m.transformer_config(), 1, AttnMaskType.causal).eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, h, 16, generator=g) for h in (8, 4, 4))  # [s, b, heads, d]
    full = attention(q, k, v, None)
    last = attention(q[-1:], k, v, None)  # decode: 1 query, causal, 6 cached keys
    assert torch.allclose(last, full[-1:], atol=1e-6)
    top_left = torch.nn.functional.scaled_dot_product_attention(
        q[-1:].permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
        is_causal=True, enable_gqa=True, scale=attention.softmax_scale,
    ).permute(2, 0, 1, 3).reshape(1, 2, -1)
    assert (top_left - full[-1:]).abs().max() > 1e-2  # the trap is real


def _tiny_state(family):
    """Random weights whose output layer is scaled up, so that greedy choices are far from ties
    (the margins are asserted where it matters)."""
    m = tiny_config(family)
    state = random_canonical_state(m)
    tied = "output_layer.weight" not in state
    key = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
    state[key] = state[key] * 30
    return state


def _tiny_generator(family="llama", tp=1, state=None, pp=1):
    """A tiny elastic model (this rank's TP shard / PP stage) in an ElasticGenerator."""
    m = tiny_config(family)
    state = state if state is not None else _tiny_state(family)
    model = build_gpt_model(m, m.transformer_config(tp, pp))
    load_canonical_state_dict(model, state, m)
    model.eval()
    selector = SubnetworkSelector(None, m, elastic_choices(m), tp)
    generator = ElasticGenerator(model, IdTokenizer(), selector, 4, max_sequence_length=48)
    return generator, m, model


TINY_PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43]]
TINY_SPECS = [None, {"mlp": 64, "heads": 4}, {"mlp": [128, 64, 32, 64], "heads": [8, 4, 4, 8],
                                              "layers": [0, 1, 3]}]


def _full_recompute(model, prompt, tokens):
    """Logits of every generated position from one forward pass without a cache."""
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(seq, torch.arange(seq.size(1))[None], None)
    return logits[0, len(prompt) - 1 : len(prompt) + len(tokens) - 1]


@pytest.mark.parametrize("family", ["llama", "gpt3"])
def test_decode_with_kv_cache_equals_full_recomputation(family):
    """Batched prompts of different lengths (prefill, then 1-token decode steps on megatron's
    static KV cache) give, for every sub-network, the argmax of a full forward pass at every
    generated position; and the cached logits equal the recomputed ones."""
    generator, m, model = _tiny_generator(family)
    mha = [None, {"mlp": 64}, {"mlp": [128, 64, 32, 64], "layers": [0, 2, 3]}]
    specs = TINY_SPECS if family == "llama" else mha  # MHA: heads are not trimmed (see below)
    for spec in specs:
        requests = [
            generator.request(p, Sampling.greedy(12), subnetwork=spec) for p in TINY_PROMPTS
        ]
        results = generator.generate(requests)
        set_subnetwork(model, spec, m, elastic_choices(m))
        for prompt, result in zip(TINY_PROMPTS, results):
            assert len(result.tokens) == 12, result
            logits = _full_recompute(model, prompt, result.tokens)
            top2 = logits.topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # far from ties
            assert logits.argmax(-1).tolist() == result.tokens, spec
    # the logits themselves: one decode step after a prefill, through megatron's context
    set_subnetwork(model, specs[2], m, elastic_choices(m))
    seq, steps = _cached_steps(model)
    with torch.no_grad():
        full = model(seq, torch.arange(9)[None], None)
    cached = torch.cat([steps[0][:, -1:]] + steps[1:], dim=1)
    assert (cached - full[:, 5:]).abs().max() <= 1e-4  # |logits| ~ 20


def _cached_steps(model):
    """A 6-token prefill and 3 one-token decode steps through megatron's static KV cache: the
    sequence and each step's logits."""
    from megatron.core.inference.contexts import StaticInferenceContext

    seq = torch.tensor([TINY_PROMPTS[0] + [3, 4, 5]])
    context = StaticInferenceContext(1, 32)
    kw = dict(inference_context=context, runtime_gather_output=True)
    with torch.no_grad():
        steps = [model(seq[:, :6], torch.arange(6)[None], None, **kw)]
        for pos in range(6, 9):
            context.sequence_len_offset = pos
            steps.append(model(seq[:, pos : pos + 1], torch.tensor([[pos]]), None, **kw))
    return seq, steps


def test_inference_steps_run_the_layer_arithmetic_without_megatron_s_layer_machinery(
        monkeypatch):
    """Engine steps (grad disabled, an inference context) skip TransformerLayer's per-layer
    machinery (elastic/layer.py): megatron's _forward_attention never runs in a generation, and
    prefill and decode steps through a KV cache give exactly the logits of megatron's path."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_flextron.elastic.layer import ElasticTransformerLayer

    generator, m, model = _tiny_generator("llama")
    layers = [x for x in model.modules() if isinstance(x, ElasticTransformerLayer)]
    stock_calls = []
    stock = TransformerLayer._forward_attention
    monkeypatch.setattr(TransformerLayer, "_forward_attention",
                        lambda self, *a, **k: stock_calls.append(1) or stock(self, *a, **k))
    results = generator.generate([generator.request(TINY_PROMPTS[0], Sampling.greedy(4),
                                                    subnetwork=TINY_SPECS[1])])
    assert len(results[0].tokens) == 4 and stock_calls == []

    set_subnetwork(model, TINY_SPECS[2], m, elastic_choices(m))
    fast = torch.cat(_cached_steps(model)[1], dim=1)
    assert stock_calls == []
    for layer in layers:
        layer._plain = False  # megatron's TransformerLayer.forward
    reference = torch.cat(_cached_steps(model)[1], dim=1)
    assert len(stock_calls) > 0
    assert torch.equal(fast, reference)
    set_subnetwork(model, None, m, elastic_choices(m))


def test_decode_steps_take_the_decode_attention_path_with_megatron_s_numbers(monkeypatch):
    """Decode-only steps on the dynamic context run decode_attention.py (megatron's calls
    without Attention.forward's bookkeeping): the same tokens and log probabilities, to the
    bit, as Attention.forward, for a batch of three requests (full and trimmed heads)."""
    from megatron_flextron.elastic import attention as elastic_attention

    generator, m, model = _tiny_generator("llama")
    attentions = [x for x in model.modules()
                  if isinstance(x, elastic_attention.ElasticSelfAttention)]
    decoded = []
    inner = elastic_attention.dynamic_decode
    monkeypatch.setattr(elastic_attention, "dynamic_decode",
                        lambda *a: decoded.append(1) or inner(*a))

    def run():
        sampling = Sampling(max_new_tokens=6, top_k=1, logprobs=2)
        results = generator.generate([generator.request(p, sampling, subnetwork=spec)
                                      for p in TINY_PROMPTS for spec in TINY_SPECS[:2]])
        return [(r.tokens, r.logprobs, r.top_logprobs) for r in results]

    fast = run()
    assert len(decoded) > 0
    for attention in attentions:
        attention._decode_plain = False  # megatron's Attention.forward
    count = len(decoded)
    reference = run()
    assert len(decoded) == count
    assert fast == reference


def test_mha_head_trimming_is_refused_with_a_clear_message():
    generator, m, _ = _tiny_generator("gpt3")
    with pytest.raises(ValueError, match="MHA head trimming changes the number of KV heads"):
        generator.request([1, 2, 3], Sampling.greedy(4), subnetwork={"heads": 4})
    with pytest.raises(ValueError, match="MHA head trimming"):  # a budget's nearest choices
        generator.request([1, 2, 3], Sampling.greedy(4), budget=0.5)
    assert generator.request([1, 2], Sampling.greedy(4), subnetwork={"mlp": 64}).architecture
    with pytest.raises(ValueError, match="exceeds the maximum sequence length 48"):
        generator.request([1] * 40, Sampling.greedy(9))


def test_the_model_keeps_a_lane_s_sub_network_between_steps_and_is_full_afterwards():
    """Switching the elastic state costs a pass over every layer: it is set once per run of one
    lane, not per step, and reset when the work is done."""
    generator, _, model = _tiny_generator("llama")
    mlps = [layer.mlp for layer in transformer_blocks(model)]
    rid = generator.new_id()
    generator.add(rid, generator.request(TINY_PROMPTS[0], Sampling.greedy(4),
                                         subnetwork={"mlp": 64, "heads": 4}), seed=0)
    generator.step()
    assert [m.active_width for m in mlps] == [64] * len(mlps)  # held between steps
    while generator.busy:
        generator.step()
    assert [m.active_width for m in mlps] == [None] * len(mlps)  # the full model when idle
    generator.generate([generator.request(TINY_PROMPTS[1], Sampling.greedy(3),
                                          subnetwork={"mlp": 32, "heads": 4})])
    assert [m.active_width for m in mlps] == [None] * len(mlps)


def test_decode_step_selections_equal_the_gathered_weights():
    """Without grad and for a few tokens, trimmed GQA heads select outputs of the full QKV
    product and pad the projection's input (no weight gather): the same numbers as the gather
    (the path with grad, and for many tokens)."""
    generator, m, model = _tiny_generator("llama")
    set_subnetwork(model, {"heads": 4}, m, elastic_choices(m))
    attention = transformer_blocks(model)[0].self_attention
    qkv, proj = attention.linear_qkv, attention.linear_proj
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, qkv.input_size, generator=g)
    h = torch.randn(3, 1, proj.weight.shape[1] // 2, generator=g)
    with torch.enable_grad():
        gathered = qkv(x)[0], proj(h)[0]
    with torch.no_grad():
        selected = qkv(x)[0], proj(h)[0]
    for a, b in zip(gathered, selected):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    set_subnetwork(model, None, m, elastic_choices(m))


def test_generation_stops_at_the_end_of_document_token():
    generator, _, _ = _tiny_generator("llama")
    prompts = TINY_PROMPTS[:2]
    full = generator.generate([generator.request(p, Sampling.greedy(12)) for p in prompts])
    assert [r.finish_reason for r in full] == ["length", "length"]
    first = full[0].tokens
    # the first token that is not a repeat: generation stops just before it
    stop = next((t for j, t in enumerate(first) if j and t not in first[:j]), first[0])
    generator.tokenizer.eod = stop  # the controller reads its tokenizer's EOD per batch
    cut = generator.generate([generator.request(p, Sampling.greedy(12)) for p in prompts])
    assert cut[0].tokens == first[: first.index(stop)] and cut[0].finish_reason == "eod"
    other = full[1].tokens  # the other request of the batch stops at its own EOD, if any
    assert cut[1].tokens == (other[: other.index(stop)] if stop in other else other)


def test_requests_join_a_running_batch_with_their_own_seeds_and_stops():
    """A request added while others decode (same or another sub-network) gets the tokens it gets
    alone; a seeded sampled request draws the same alone and in a batch; a stop string ends the
    text before it; a cancelled request leaves the batch."""
    generator, _, _ = _tiny_generator("llama")
    seeded = Sampling(max_new_tokens=10, temperature=1.0, top_k=20, seed=7, logprobs=2)
    spec = TINY_SPECS[1]
    alone = [generator.generate([generator.request(p, Sampling.greedy(12), subnetwork=s)])[0]
             for p, s in zip(TINY_PROMPTS, [None, spec, None])]
    alone_seeded = generator.generate([generator.request(TINY_PROMPTS[0], seeded)])[0]
    results, ids = {}, {}
    ids["a"] = generator.new_id()
    generator.add(ids["a"], generator.request(TINY_PROMPTS[0], Sampling.greedy(12)), 0)
    for _ in range(3):  # a decodes alone for three steps
        generator.step()
    for name, prompt, sampling, s in (("b", TINY_PROMPTS[1], Sampling.greedy(12), spec),
                                      ("c", TINY_PROMPTS[2], Sampling.greedy(12), None),
                                      ("seeded", TINY_PROMPTS[0], seeded, None),
                                      ("cancelled", TINY_PROMPTS[1], Sampling.greedy(12), None)):
        ids[name] = generator.new_id()
        seed = 1 if sampling.seed is None else sampling.seed  # what the scheduler passes
        generator.add(ids[name], generator.request(prompt, sampling, subnetwork=s), seed)
    generator.step()
    results[ids["cancelled"]] = generator.cancel(ids["cancelled"]).result
    while generator.busy:
        for update in generator.step():
            if update.result is not None:
                results[update.rid] = update.result
    got = {name: results[rid] for name, rid in ids.items()}
    assert [got[k].tokens for k in "abc"] == [r.tokens for r in alone]
    assert got["seeded"].tokens == alone_seeded.tokens
    assert got["seeded"].logprobs == pytest.approx(alone_seeded.logprobs, abs=1e-5)
    assert got["cancelled"].finish_reason == "cancelled" and len(got["cancelled"].tokens) <= 2
    assert not generator.live
    text = alone[0].text
    stop = text[text.index(" ", 1) : text.index(" ", 1) + 3]
    cut = generator.generate([generator.request(TINY_PROMPTS[0], Sampling(
        max_new_tokens=12, top_k=1, stop=(stop,)))])[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]


def _tp_pp_body(rank, world_size, state, expected):
    from megatron_flextron.parallel import initialize_model_parallel

    for tp, pp in ((2, 1), (1, 2)):
        initialize_model_parallel(tp, pp, seed=1234)
        generator, _, _ = _tiny_generator("llama", tp, state, pp)
        for spec, want in zip(TINY_SPECS, expected):
            requests = [generator.request(p, Sampling.greedy(12), subnetwork=spec)
                        for p in TINY_PROMPTS]
            got = [r.tokens for r in generator.generate(requests)]
            assert got == want, (tp, pp, spec, got, want)
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def test_tp2_and_pp2_generate_what_one_process_generates():
    state = _tiny_state("llama")
    generator, _, _ = _tiny_generator("llama", state=state)
    expected = [
        [r.tokens for r in generator.generate(
            [generator.request(p, Sampling.greedy(12), subnetwork=s) for p in TINY_PROMPTS])]
        for s in TINY_SPECS
    ]
    run_distributed(_tp_pp_body, 2, state, expected)


def test_token_routed_generation_equals_routed_full_recomputation(tmp_path):
    """--router token: the checkpoint's token routers pick each token's MLP width inside the
    cached decode steps exactly as in one full forward pass; budgets change what is generated."""
    from megatron_flextron.routers.checkpoint import load_budget_policy
    from megatron_flextron.routers.token import TokenRouter
    from megatron_flextron.routers.token_training import save_token_routers

    m = tiny_config("llama")
    torch.manual_seed(3)
    routers = [TokenRouter(m.hidden_size, 3, 2) for _ in range(m.num_layers)]
    for r in routers:
        with torch.no_grad():
            r.linear.weight.mul_(50)  # decisive routing: widths far from argmax ties
            r.budget_bias.copy_(torch.tensor([[4.0, 0.0, -4.0], [-4.0, 0.0, 4.0]]))
    save_token_routers(str(tmp_path), routers, [128, 64, 32], [1.0, 0.5])
    generator, _, model = _tiny_generator("llama")
    policy = load_budget_policy(str(tmp_path), m, elastic_choices(m), "token", gpt=model)
    policy.reset(model)
    selector = SubnetworkSelector(policy, m, elastic_choices(m))
    generator.selector = selector
    widths = {}
    for budget in (1.0, 0.5):
        requests = [generator.request(p, Sampling.greedy(10), budget=budget) for p in TINY_PROMPTS]
        results = generator.generate(requests)
        assert results[0].architecture.describe() == {
            "budget": budget, "router": "token", "chosen_by": "token routers"}
        with selector.active(model, results[0].architecture):
            for prompt, result in zip(TINY_PROMPTS, results):
                logits = _full_recompute(model, prompt, result.tokens)
                top2 = logits.topk(2, dim=-1).values
                assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
                assert logits.argmax(-1).tolist() == result.tokens
            widths[budget] = policy.measured()["mean_mlp_width_fraction"]
    assert widths[0.5] < widths[1.0]
    with pytest.raises(ValueError, match="outside the trained range"):
        generator.request([1, 2], Sampling.greedy(2), budget=0.3)
    with pytest.raises(ValueError, match="give a budget"):
        generator.request([1, 2], Sampling.greedy(2))


@pytest.fixture(scope="module")
def smol():
    from megatron_flextron.inference import build_generator

    ckpt, path = smollm2_flextron()
    return ckpt, path, build_generator(path, max_batch_size=4, max_sequence_length=64)


@pytest.mark.parametrize("spec", [None, HOMOGENEOUS, PER_LAYER], ids=["full", "homogeneous",
                                                                       "per-layer"])
def test_smollm2_greedy_equals_transformers_generate(smol, spec):
    ckpt, _, generator = smol
    requests = [generator.request(p, Sampling.greedy(NEW_TOKENS), subnetwork=spec) for p in PROMPTS]
    results = generator.generate(requests)  # the two prompts batched (different lengths)
    reference = hf_model(ckpt, spec)
    for request, result in zip(requests, results):
        want, margin = hf_greedy(reference, request.prompt_tokens, NEW_TOKENS,
                                 generator.tokenizer.eod)
        assert margin > 1e-3, f"reference path passes a near-tie ({margin}): pick another prompt"
        assert result.tokens == want and len(want) == NEW_TOKENS
    if spec is None:
        assert results[0].text.startswith(" Paris")


def _tool(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), *args],
                          capture_output=True, text=True, env=env)


def test_generate_tool_prints_one_line_per_prompt_and_refuses_bad_input(smol):
    _, path, generator = smol
    out = _tool("--load", path, "--budget", "0.5", "--max-new-tokens", "8",
                "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    arch = generator.selector.resolve(budget=0.5)
    want = generator.generate([generator.request(p, Sampling.greedy(8), budget=0.5)
                               for p in PROMPTS])
    assert [line["tokens"] for line in lines] == [r.tokens for r in want]
    assert [line["text"] for line in lines] == [r.text for r in want]
    assert lines[0]["subnetwork"] == arch.subnetwork.to_dict() == {"mlp": 768, "heads": 6}
    assert lines[0]["chosen_by"] == "nearest choices" and lines[0]["budget"] == 0.5
    bad = _tool("--load", path, "--subnetwork", '{"mlp": 1000}', "--prompt", "x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: layer 0: MLP width 1000 is not one of the configured choices "
        "[384, 768, 1152, 1536]"
    ]
