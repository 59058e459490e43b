"""The text-generation server on SmolLM2's flextron conversion, through a real HTTP client:
concurrent requests at three budgets, each answered by its own sub-network from one model copy;
bad requests get 400 and the server keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from serving_helpers import PROMPTS, smollm2_flextron

from megatron_flextron.inference import Sampling
from megatron_flextron.inference.server import TextGenerationServer

pytestmark = pytest.mark.usefixtures("megatron_single_process")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = (1.0, 0.75, 0.5)
PROMPT = PROMPTS[1]  # the three budgets' sub-networks continue it differently
NEW = 12


@pytest.fixture(scope="module")
def served():
    from megatron_flextron.inference import build_generator

    _, path = smollm2_flextron()
    generator = build_generator(path, max_batch_size=4, max_sequence_length=64)
    # each budget's own output, one request at a time, before the server shares the model
    expected = {
        b: generator.generate([generator.request(PROMPT, Sampling.greedy(NEW), budget=b)])[0]
        for b in BUDGETS
    }
    server = TextGenerationServer(generator, "127.0.0.1", 0, batch_window_s=0.2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}", generator, expected
    server.shutdown()
    thread.join()


def _call(url, method, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_requests_at_three_budgets_get_their_own_sub_networks(served):
    url, generator, expected = served
    calls = {
        1.0: ("/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1,
                              "budget": 1.0}),
        0.75: ("/completions", "POST", {"prompt": PROMPT, "max_tokens": NEW,
                                        "temperature": 0, "budget": 0.75}),
        0.5: ("/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1,
                              "budget": 0.5}),
    }
    replies, start = {}, threading.Barrier(len(calls))

    def client(budget):
        path, method, body = calls[budget]
        start.wait()
        replies[budget] = _call(url + path, method, body)

    threads = [threading.Thread(target=client, args=(b,)) for b in BUDGETS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = {}
    for budget, (status, reply) in replies.items():
        assert status == 200, reply
        if "choices" in reply:  # /completions: the continuation
            choice = reply["choices"][0]
            tokens[budget], arch = choice["tokens"], choice["architecture"]
            assert choice["text"] == expected[budget].text
        else:  # /api: prompt + continuation, as Megatron returns them
            prompt = generator.request(PROMPT, Sampling.greedy(1)).prompt_tokens
            assert reply["tokens"][0][: len(prompt)] == prompt
            tokens[budget], arch = reply["tokens"][0][len(prompt) :], reply["architecture"][0]
            assert reply["text"][0] == PROMPT + expected[budget].text
        assert tokens[budget] == expected[budget].tokens
        assert arch == expected[budget].architecture.describe()
        assert arch["budget"] == budget and arch["chosen_by"] == "nearest choices"
    assert len({tuple(t) for t in tokens.values()}) == 3  # three different sub-networks' outputs
    assert replies[0.5][1]["architecture"][0]["subnetwork"] == {"mlp": 768, "heads": 6}


def test_mixed_budget_batch_is_grouped_by_architecture(served):
    """One generate call with budgets interleaved: each request gets what a batch of its own
    architecture gives (the batches test_generate checks against transformers)."""
    _, generator, _ = served
    mixed = [(PROMPTS[0], 1.0), (PROMPTS[1], 0.75), (PROMPTS[0], 0.75), (PROMPTS[1], 1.0)]
    got = generator.generate([generator.request(p, Sampling.greedy(NEW), budget=b)
                              for p, b in mixed])
    for budget in (1.0, 0.75):
        alone = generator.generate([generator.request(p, Sampling.greedy(NEW), budget=budget)
                                    for p in PROMPTS])
        mine = {p: r.tokens for (p, b), r in zip(mixed, got) if b == budget}
        assert [mine[p] for p in PROMPTS] == [r.tokens for r in alone]


def test_bad_requests_get_400_and_the_server_keeps_serving(served):
    url, _, expected = served
    api = url + "/api"
    good = {"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1}
    bad = [
        ({**good, "budget": 1.5}, "budget 1.5 must lie in (0, 1]"),
        ({**good, "budget": "half"}, "budget must be a number"),
        ({**good, "subnetwork": {"mlp": 1000}}, "MLP width 1000 is not one of"),
        ({**good, "subnetwork": {"mlp": 768}, "budget": 0.5}, "either a budget or a subnetwork"),
        ({**good, "tokens_to_generate": 100}, "exceeds the maximum sequence length 64"),
        ({**good, "top_k": 5, "top_p": 0.9}, "either top_k or top_p"),
        ({**good, "temperature": -1}, "temperature must be"),
        ({"prompts": "not a list"}, "prompts must be a non-empty list"),
        (b"{not json", "not valid JSON"),
    ]
    for body, message in bad:
        status, reply = _call(api, "PUT", body)
        assert status == 400 and message in reply["error"], (body, reply)
    status, reply = _call(url + "/completions", "POST", {"prompt": "x", "max_tokens": 0})
    assert status == 400 and "tokens to generate" in reply["error"]
    assert _call(url + "/nowhere", "PUT", good)[0] == 404
    status, reply = _call(api, "PUT", {**good, "budget": 0.5})
    assert status == 200 and reply["text"][0] == PROMPT + expected[0.5].text
    # sampling with a seed is reproducible
    sampled = {**good, "top_k": 20, "temperature": 0.8, "random_seed": 7, "budget": 0.75}
    assert _call(api, "PUT", sampled) == _call(api, "PUT", sampled)


def test_server_tool_refuses_a_checkpoint_without_a_tokenizer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "run_text_generation_server.py"),
         "--load", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, env=env,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no tokenizer/ folder: cannot generate text"
    ]
