"""Generation and serving at mixture-of-experts sub-networks and budgets, on a tiny random
Qwen3-MoE flextron checkpoint with a tokenizer: megatron's dynamic engine at a sub-network (fewer
experts, narrower experts, smaller top-k) equals greedy decoding by hand with the elastic model
and transformers' greedy generate on the exported sub-network, token for token (top-2 margins
asserted); every sub-network runs on the one weight copy; the server answers concurrent requests
at two budgets each as alone; the OpenAI client lists and uses the MoE model ids; the tool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
import torch
from helpers import train_tiny_tokenizer
from serving_helpers import hf_greedy
from test_hf_moe import tiny_moe

from megatron_flextron.checkpoint.flextron import read_flextron, save_flextron
from megatron_flextron.config import ElasticConfig
from megatron_flextron.convert import ConvertOptions, convert
from megatron_flextron.convert.formats.hf import load_hf
from megatron_flextron.elastic import build_elastic_model, set_subnetwork
from megatron_flextron.elastic.moe import ElasticMoELayer
from megatron_flextron.elastic.tp_layout import load_canonical_state_dict
from megatron_flextron.inference import Sampling

pytestmark = pytest.mark.usefixtures("megatron_single_process")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "qwen3moe"
NEW = 12
PROMPT = "The capital of France is"
# 4 of 8 experts, 16 of 32 neurons each, top-1 of 2: every MoE axis cut, attention kept
SUBNET = {"experts": 4, "moe_ffn": 16, "topk": 1}
BUDGETS = (1.0, 0.75)
# the smallest top-2 logit gap along a reference decode, relative to the largest logit: 20x the
# 1e-5 transformers and the elastic MoE agree to (test_hf_moe.py), so no near-tie decides a token
# (measured here: 8.7e-3, 2.3e-3, 1.25e-2)
MIN_MARGIN = 2e-4


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    """A flextron checkpoint of a tiny random Qwen3-MoE (2 layers, 8 experts of 32, top-2, q/k
    norms) with a 320-token BPE; its output layer scaled up so greedy choices are far apart, its
    experts so that they, not attention alone, decide the tokens."""
    from megatron_flextron.data.corpus import wiki_documents

    root = tmp_path_factory.mktemp("moe_serving")
    tok_dir = str(root / "tokenizer")
    train_tiny_tokenizer(tok_dir, wiki_documents("train")[:300])
    model = tiny_moe("qwen3_moe", root / "hf", vocab_size=320)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.mul_(5.0)
    model.save_pretrained(root / "hf")
    ckpt = load_hf(str(root / "hf"))
    ckpt.tokenizer_dir, ckpt.elastic = tok_dir, ElasticConfig.from_ratios(ckpt.model)
    os.makedirs(root / "fx")
    save_flextron(ckpt, str(root / "fx"))
    return str(root / "fx")


@pytest.fixture(scope="module")
def generator(moe_ckpt):
    from megatron_flextron.inference import build_generator

    return build_generator(moe_ckpt, max_batch_size=4, max_sequence_length=64)


def _by_hand(ckpt_dir: str, spec, prompt_ids, new: int, eod: int):
    """Greedy decoding with the elastic model at ``spec``: a full forward per step, argmax; the
    tokens (EOD left out) and the smallest top-2 logit gap (relative to the largest logit)."""
    ckpt = read_flextron(ckpt_dir)
    m = ckpt.model
    model = build_elastic_model(m, m.transformer_config())
    load_canonical_state_dict(model, ckpt.state, m)
    model.eval()
    set_subnetwork(model, spec, m, ckpt.elastic)
    ids, margin = list(prompt_ids), float("inf")
    with torch.no_grad():
        for _ in range(new):
            tokens = torch.tensor([ids])
            logits = model(tokens, torch.arange(len(ids))[None], None)[0, -1]
            top = logits.topk(2).values
            margin = min(margin, float((top[0] - top[1]) / logits.abs().max()))
            token = int(logits.argmax())
            if token == eod:
                break
            ids.append(token)
    return ids[len(prompt_ids) :], margin


def _exported_hf(ckpt_dir: str, spec: dict, out: str):
    """transformers' model of the sub-network exported by the hf saver."""
    import transformers

    convert(ConvertOptions("flextron", "hf", ckpt_dir, out, subnetwork=json.dumps(spec)))
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["model_type"] == "qwen3_moe"
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_greedy_at_moe_sub_networks_equals_decoding_by_hand_and_transformers(
    moe_ckpt, generator, tmp_path
):
    """The spec, and the budgets' sub-networks, in one batch (one engine lane each, steps
    interleaved): each equals the elastic model decoded by hand and transformers' generate."""
    eod = generator.tokenizer.eod
    requests = [generator.request(PROMPT, Sampling.greedy(NEW), subnetwork=SUBNET)]
    requests += [generator.request(PROMPT, Sampling.greedy(NEW), budget=b) for b in BUDGETS]
    results = generator.generate(requests)
    specs = [r.architecture.subnetwork.to_dict() for r in requests]
    assert specs[0] == {"mlp": 96, "heads": 4, **SUBNET}
    # budget 0.75: the largest homogeneous choice with at most 0.75 of the active parameters
    assert specs[2] == {"mlp": 96, "heads": 2, "experts": 8, "moe_ffn": 24, "topk": 1}
    prompt_ids = requests[0].prompt_tokens
    for i, (spec, result) in enumerate(zip(specs, results)):
        ref, margin = _by_hand(moe_ckpt, spec, prompt_ids, NEW, eod)
        print(f"{spec}: {result.tokens}, smallest relative top-2 margin {margin:.4f}")
        assert margin > MIN_MARGIN, (spec, margin)
        assert result.tokens == ref, spec
        assert len(ref) == NEW and result.finish_reason == "length"
        hf = _exported_hf(moe_ckpt, spec, str(tmp_path / f"hf{i}"))
        hf_tokens, _ = hf_greedy(hf, prompt_ids, NEW, eod)
        assert hf_tokens == ref, spec
    # three different functions: a sub-network run at the full shape would fail above
    assert len({tuple(r.tokens) for r in results}) == 3


def test_every_sub_network_runs_on_the_one_weight_copy(generator, monkeypatch):
    """Every lane's engine wraps the same model; generating at MoE sub-networks moves, copies
    and adds no parameter; the model is the full one afterwards; megatron's inference-only MoE
    dispatcher is absent, so the engine runs the elastic MoE layer's own forward, with the
    engine's InferenceMode on and the lane's sub-network set."""
    from megatron.core.inference.utils import InferenceMode

    seen = set()
    forward = ElasticMoELayer.forward

    def recording(self, *args, **kwargs):
        seen.add((InferenceMode.is_active(), self.active, self.router.topk))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ElasticMoELayer, "forward", recording)
    model = generator.model
    before = {n: (p.data_ptr(), p.shape) for n, p in model.named_parameters()}
    generator.generate([generator.request(PROMPT, Sampling.greedy(3), budget=b)
                        for b in (0.75, 0.5)])  # fmt: skip
    assert seen == {(True, (8, 24, 1), 1), (True, (8, 8, 1), 1)}
    assert {n: (p.data_ptr(), p.shape) for n, p in model.named_parameters()} == before
    assert len(generator.lanes) >= 2
    for lane in generator.lanes.values():
        assert lane.controller.inference_wrapped_model.model is model
    layers = [m for m in model.modules() if isinstance(m, ElasticMoELayer)]
    assert len(layers) == 2
    for layer in layers:
        assert layer.active == (None, None, None) and layer.router.topk == 2
        assert not hasattr(layer, "_inference_token_dispatcher")


def test_a_stock_megatron_moe_model_is_refused_by_name():
    """megatron's own MoE layer ignores sub-networks: the engine says so instead of serving the
    full model under a sub-network's name."""
    from helpers import elastic_choices
    from helpers import tiny_moe as tiny_moe_config

    from megatron_flextron.elastic.hybrid import build_hybrid_model
    from megatron_flextron.inference import ElasticGenerator, SubnetworkSelector

    m = tiny_moe_config()
    stock = build_hybrid_model(m, m.transformer_config(), elastic=False, core_attention="local")
    selector = SubnetworkSelector(None, m, elastic_choices(m))
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp: MoELayer .* cannot serve"):
        ElasticGenerator(stock, object(), selector)


def test_a_budget_below_every_moe_sub_network_says_what_runs(generator):
    """The smallest sub-network keeps 0.674 of the active parameters (the embeddings and the
    output layer are most of this tiny model): a budget of 0.5 runs it and says so."""
    arch = generator.selector.resolve(budget=0.5)
    assert arch.info["note"] == (
        "budget 0.5 is below the smallest sub-network: it runs that, {'mlp': 96, 'heads': 2, "
        "'experts': 8, 'moe_ffn': 8, 'topk': 1}, 0.674 of the full model's active parameters"
    )
    assert "note" not in generator.selector.resolve(budget=0.75).info


def _tp2_body(rank, world_size, ckpt_dir, selections, expected):
    from megatron_flextron.inference import build_generator
    from megatron_flextron.parallel import initialize_model_parallel

    initialize_model_parallel(world_size, 1, seed=1234)
    generator = build_generator(ckpt_dir, max_batch_size=4, max_sequence_length=64)
    requests = [generator.request(PROMPT, Sampling.greedy(NEW), **s) for s in selections]
    got = [r.tokens for r in generator.generate(requests)]
    assert got == expected, (rank, got, expected)


def test_tp2_serves_the_moe_sub_networks_one_process_serves(moe_ckpt, generator):
    """The checkpoint loaded at TP=2 (every expert's neurons split over the ranks, megatron's
    all-gather dispatcher across them) generates, at a spec and a budget, what TP=1 does."""
    from distributed import run_distributed

    selections = [{"subnetwork": SUBNET}, {"budget": 0.75}, {}]
    requests = [generator.request(PROMPT, Sampling.greedy(NEW), **s) for s in selections]
    expected = [r.tokens for r in generator.generate(requests)]
    assert len({tuple(t) for t in expected}) == 3
    run_distributed(_tp2_body, 2, moe_ckpt, selections, expected)


def test_generate_tool_runs_moe_sub_networks_and_budgets(moe_ckpt, generator):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env.pop("MASTER_PORT", None)
    for flag, value, select in (("--subnetwork", json.dumps(SUBNET), {"subnetwork": SUBNET}),
                                ("--budget", "0.75", {"budget": 0.75})):
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load", moe_ckpt,
             flag, value, "--max-new-tokens", str(NEW), "--prompt", PROMPT],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        (line,) = [json.loads(x) for x in out.stdout.strip().splitlines()]
        request = generator.request(PROMPT, Sampling.greedy(NEW), **select)
        want = generator.generate([request])[0]
        assert line["tokens"] == want.tokens and line["text"] == want.text
        assert {k: v for k, v in line.items() if k not in ("prompt", "text", "tokens")} == {
            "finish_reason": "length", **request.architecture.describe()}
    assert line["subnetwork"]["moe_ffn"] == 24 and line["chosen_by"] == "nearest choices"


# the server tests last: the tests above call the generator directly, which only the server's
# scheduler thread may do once it runs
@pytest.fixture(scope="module")
def served(generator):
    from megatron_flextron.inference.server import TextGenerationServer

    expected = {  # each budget alone, before the server shares the model
        b: generator.generate([generator.request(PROMPT, Sampling.greedy(NEW), budget=b)])[0]
        for b in BUDGETS
    }
    server = TextGenerationServer(generator, "127.0.0.1", 0, model_name=NAME)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}", expected
    server.shutdown()
    thread.join()


def _call(url, method, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_concurrent_requests_at_two_moe_budgets_each_equal_their_own_answer(served, generator):
    url, expected = served
    assert expected[1.0].tokens != expected[0.75].tokens
    calls = {
        1.0: ("/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1,
                              "budget": 1.0}),
        0.75: ("/v1/completions", "POST", {"prompt": PROMPT, "max_tokens": NEW,
                                           "temperature": 0, "model": f"{NAME}@0.75"}),
    }  # fmt: skip
    replies, start = {}, threading.Barrier(len(calls))

    def run(budget):
        start.wait()
        replies[budget] = _call(url + calls[budget][0], *calls[budget][1:])

    threads = [threading.Thread(target=run, args=(b,)) for b in BUDGETS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    prompt = generator.request(PROMPT, Sampling.greedy(1)).prompt_tokens
    api = replies[1.0]
    assert api["tokens"][0] == prompt + expected[1.0].tokens
    assert api["text"][0] == PROMPT + expected[1.0].text
    assert api["architecture"][0] == expected[1.0].architecture.describe()
    choice = replies[0.75]["choices"][0]
    assert choice["tokens"] == expected[0.75].tokens and choice["text"] == expected[0.75].text
    assert choice["architecture"] == expected[0.75].architecture.describe()
    assert choice["architecture"]["subnetwork"]["moe_ffn"] == 24


def test_openai_client_lists_and_uses_the_moe_model_ids(served):
    import openai

    url, expected = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in client.models.list()]
    budgets = [f"{NAME}@{b}" for b in ("1", "0.75", "0.5", "0.25")]
    assert ids[:5] == [NAME, *budgets]
    named = f"{NAME}@experts4-moe_ffn16-topk1-heads4"
    # experts 8/6/4/2 x widths 32/24/16/8 x top-k 2/1 x heads 4/2
    assert named in ids and len(ids) == 5 + 4 * 4 * 2 * 2

    reply = client.completions.create(model=f"{NAME}@0.75", prompt=PROMPT, max_tokens=NEW,
                                      temperature=0)
    assert reply.choices[0].text == expected[0.75].text and reply.model == f"{NAME}@0.75"
    # a named MoE sub-network as the model id and as the body field: the same text
    by_id = client.completions.create(model=named, prompt=PROMPT, max_tokens=NEW, temperature=0)
    by_body = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW,
                                        temperature=0, extra_body={"subnetwork": SUBNET})
    assert by_id.choices[0].text == by_body.choices[0].text
    assert by_id.choices[0].text not in (expected[1.0].text, expected[0.75].text)
    with pytest.raises(openai.BadRequestError, match="experts 3 is not one of the configured"):
        client.completions.create(model=f"{NAME}@experts3-moe_ffn16-topk1", prompt=PROMPT,
                                  max_tokens=2)
