"""The text-generation server on SmolLM2's flextron conversion, through real HTTP clients (the
official openai client, Megatron's PUT /api format, raw sockets): budgets as model ids, streaming,
seeds under concurrency, stop strings and end tokens, continuous batching, the trust boundary
(bad requests are 4xx naming the field, keep-alive survives them), cancellation and signals."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
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
NAME = "smollm2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served():
    from megatron_flextron.inference import build_generator

    _, path = smollm2_flextron()
    generator = build_generator(path, max_batch_size=4, max_sequence_length=128)
    # each budget's own output, one request at a time, before the server shares the model
    expected = {
        b: generator.generate([generator.request(PROMPT, Sampling.greedy(NEW), budget=b)])[0]
        for b in BUDGETS
    }
    server = TextGenerationServer(generator, "127.0.0.1", 0, model_name=NAME)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}", generator, expected, server
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def _call(url, method, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = headers or {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_requests_at_three_budgets_get_their_own_sub_networks(served):
    url, generator, expected, _ = served
    calls = {
        1.0: ("/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1,
                              "budget": 1.0}),
        0.75: ("/v1/completions", "POST", {"prompt": PROMPT, "max_tokens": NEW,
                                           "temperature": 0, "model": f"{NAME}@0.75"}),
        0.5: ("/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1,
                              "budget": 0.5}),
    }
    replies, start = {}, threading.Barrier(len(calls))

    def run(budget):
        path, method, body = calls[budget]
        start.wait()
        replies[budget] = _call(url + path, method, body)

    threads = [threading.Thread(target=run, args=(b,)) for b in BUDGETS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for budget, (status, reply) in replies.items():
        assert status == 200, reply
        if "choices" in reply:  # OpenAI: the continuation
            choice = reply["choices"][0]
            tokens, arch = choice["tokens"], choice["architecture"]
            assert choice["text"] == expected[budget].text
        else:  # /api: prompt + continuation, as Megatron returns them
            prompt = generator.request(PROMPT, Sampling.greedy(1)).prompt_tokens
            assert reply["tokens"][0][: len(prompt)] == prompt
            tokens, arch = reply["tokens"][0][len(prompt) :], reply["architecture"][0]
            assert reply["text"][0] == PROMPT + expected[budget].text
        assert tokens == expected[budget].tokens
        assert arch == expected[budget].architecture.describe()
    assert len({tuple(e.tokens) for e in expected.values()}) == 3  # three sub-networks' outputs
    assert replies[0.5][1]["architecture"][0]["subnetwork"] == {"mlp": 768, "heads": 6}


def test_openai_client_models_completions_chat_and_streaming(served, client):
    _, generator, expected, _ = served
    ids = [m.id for m in client.models.list()]
    assert ids[:5] == [NAME, f"{NAME}@1", f"{NAME}@0.75", f"{NAME}@0.5", f"{NAME}@0.25"]
    assert f"{NAME}@mlp768-heads6" in ids and len(ids) == 5 + 4 * 3

    reply = client.completions.create(model=f"{NAME}@0.5", prompt=PROMPT, max_tokens=NEW,
                                      temperature=0)
    assert reply.choices[0].text == expected[0.5].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.id.startswith("cmpl-") and reply.model == f"{NAME}@0.5" and reply.created > 0
    n_prompt = len(generator.request(PROMPT, Sampling.greedy(1)).prompt_tokens)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (n_prompt, NEW)
    # the same sub-network named by its shape, and by the body field: the same text
    same = client.completions.create(model=f"{NAME}@mlp768-heads6", prompt=PROMPT,
                                     max_tokens=NEW, temperature=0)
    body = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                     extra_body={"budget": 0.5})
    assert same.choices[0].text == body.choices[0].text == expected[0.5].text

    chunks = list(client.completions.create(model=f"{NAME}@0.75", prompt=PROMPT,
                                            max_tokens=NEW, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[0.75].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == NEW and len({c.id for c in chunks}) == 1

    # chat: the tokenizer's template, the turn ends at <|im_end|> (an end token of the checkpoint)
    chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=40,
                                          temperature=0)
    choice = chat.choices[0]
    assert choice.finish_reason == "stop" and "Paris" in choice.message.content
    assert "<|im_end|>" not in choice.message.content and choice.message.role == "assistant"
    assert 0 < chat.usage.completion_tokens < 40 and chat.id.startswith("chatcmpl-")
    stream = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=40,
                                            temperature=0, stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == choice.message.content
    assert parts[-1].choices[0].finish_reason == "stop"


def test_logprobs_n_and_stop(served, client):
    _, generator, expected, _ = served
    reply = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW,
                                      temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert len(lp.token_logprobs) == NEW and lp.tokens[0] == generator.tokenizer.detokenize(
        [expected[1.0].tokens[0]])
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the drawn is the best
        assert len(top) == 2 and max(top.values()) == value < 0
    chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=1)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 4 and all(e.top_logprobs[0].logprob == e.logprob for e in entries)

    # stop strings end the text before them; n choices with one seed draw seed, seed + 1, ...
    full = expected[1.0].text
    cut = full.index(" ", 2)
    stopped = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=NEW,
                                        temperature=0, stop=[full[cut : cut + 2]])
    assert stopped.choices[0].text == full[:cut] and stopped.choices[0].finish_reason == "stop"
    sampled = dict(model=NAME, prompt=PROMPT, max_tokens=NEW, temperature=0.9)
    two = client.completions.create(**sampled, n=2, seed=11)
    one = client.completions.create(**sampled, seed=12)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].text == one.choices[0].text
    assert two.usage.completion_tokens == sum(len(c.tokens) for c in two.choices)


def test_a_seeded_request_gives_the_same_text_alone_and_under_concurrency(served, client):
    url = served[0]
    seeded = dict(model=f"{NAME}@0.75", prompt=PROMPTS[0], max_tokens=NEW, temperature=0.8,
                  seed=1234)
    alone = client.completions.create(**seeded).choices[0].text
    texts, start = [], threading.Barrier(4)

    def seeded_client():
        start.wait()
        texts.append(client.completions.create(**seeded).choices[0].text)

    def others(budget):  # unseeded sampling at other budgets, in the same batches
        start.wait()
        _call(url + "/api", "PUT", {"prompts": PROMPTS, "tokens_to_generate": NEW,
                                    "temperature": 1.0, "budget": budget})

    threads = [threading.Thread(target=seeded_client) for _ in range(2)]
    threads += [threading.Thread(target=others, args=(b,)) for b in (0.75, 0.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == [alone, alone]


def test_requests_join_the_running_batch_and_a_short_one_does_not_wait(served):
    """Continuous batching: a request submitted while another decodes finishes first, at its own
    budget or the same one, with the tokens it gets alone."""
    _, generator, _, server = served
    scheduler = server.scheduler
    long = generator.request(PROMPTS[0], Sampling.greedy(60), budget=1.0)
    shorts = [generator.request(PROMPTS[1], Sampling.greedy(4), budget=b) for b in (1.0, 0.5)]
    # through the scheduler, whose thread is the one that steps the engine
    alone = [handle.wait() for handle in scheduler.submit([long] + shorts)]
    for short, want in zip(shorts, alone[1:]):
        (running,) = scheduler.submit([long])
        rid, first, _ = running.sink.get()  # the long request is decoding
        assert first.result is None
        (handle,) = scheduler.submit([short])
        assert handle.wait().tokens == want.tokens
        assert running.result is None  # still running when the short one is done
        assert running.wait().tokens == alone[0].tokens


def test_megatron_text_generation_cli_request_format(served):
    """Megatron-LM's tools/text_generation_cli.py: PUT /api with its headers, reads
    ``text[0]``, and ``message`` on an error."""
    url, _, expected, _ = served
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    status, reply = _call(url + "/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": NEW,
                                                "top_k": 1, "budget": 0.5}, headers)
    assert status == 200 and reply["text"][0] == PROMPT + expected[0.5].text
    status, reply = _call(url + "/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": 0},
                          headers)
    assert status == 400 and reply == {
        "message": "the number of tokens to generate must be an integer >= 1, got 0"}


# (request, what the reply says): tests/test_bad_input.py's error table lists them
API_REFUSED = [
    ({"tokens_to_generat": 4}, "unknown or unsupported field 'tokens_to_generat' for PUT /api"),
    ({"stop": ["\n"]}, "unknown or unsupported field 'stop' for PUT /api"),
    ({"n": 2}, "unknown or unsupported field 'n' for PUT /api"),
    ({"logprobs": True}, "logprobs=true is not supported on PUT /api"),
    ({"subnetwork": "/etc/passwd"}, "subnetwork must be an inline JSON object"),
    ({"subnetwork": "/no/such/file"}, "subnetwork must be an inline JSON object"),
    ({"budget": 1.5}, "budget 1.5 must lie in (0, 1]"),
    ({"budget": "half"}, "budget must be a number"),
    ({"subnetwork": {"mlp": 1000}}, "MLP width 1000 is not one of"),
    ({"subnetwork": {"mlp": 768}, "budget": 0.5}, "either a budget or a subnetwork"),
    ({"tokens_to_generate": 200}, "exceeds the maximum sequence length 128"),
    ({"top_k": 5, "top_p": 0.9}, "either top_k or top_p"),
    ({"temperature": -1}, "temperature must be"),
    ({"prompts": "not a list"}, "prompts must be a non-empty list"),
]
OPENAI_REFUSED = [
    ({"presence_penalty": 0.5}, "presence_penalty=0.5 is not supported", 400),
    ({"echo": True}, "echo=True is not supported", 400),
    ({"logprobs": 9}, "logprobs must be an integer in [0, 5]", 400),
    ({"best_of": 3}, "best_of=3 is not supported", 400),
    ({"max_token": 3}, "unknown or unsupported field 'max_token'", 400),
    ({"model": "gpt-4"}, "model 'gpt-4' does not exist", 404),
    ({"model": f"{NAME}@0.5", "budget": 0.5}, "already names a sub-network", 400),
    ({"stream_options": {"include_usage": True}}, "stream_options takes include_usage", 400),
]


def test_bad_requests_are_refused_naming_the_field_and_the_server_keeps_serving(served):
    url, _, expected, _ = served
    good = {"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1}
    for extra, message in API_REFUSED:
        status, reply = _call(url + "/api", "PUT", {**good, **extra})
        assert status == 400 and message in reply["message"], (extra, reply)
    status, reply = _call(url + "/api", "PUT", b"{not json")
    assert status == 400 and "not valid JSON" in reply["message"]
    prompt = {"prompt": PROMPT, "max_tokens": 4, "model": NAME}
    for extra, message, code in OPENAI_REFUSED:
        status, reply = _call(url + "/v1/completions", "POST", {**prompt, **extra})
        assert status == code and message in reply["error"]["message"], (extra, reply)
        assert reply["error"]["param"] in extra
    assert _call(url + "/nowhere", "PUT", good)[0] == 404
    assert _call(url + "/api", "POST", good)[0] == 405
    status, reply = _call(url + "/api", "PUT", {**good, "budget": 0.5})
    assert status == 200 and reply["text"][0] == PROMPT + expected[0.5].text


def test_chat_without_a_template_is_refused(served):
    url, generator, _, _ = served
    template, generator.chat_template = generator.chat_template, None
    try:
        status, reply = _call(url + "/v1/chat/completions", "POST",
                              {"model": NAME, "messages": CHAT})
    finally:
        generator.chat_template = template
    assert status == 400 and reply["error"]["message"] == (
        "this model's tokenizer has no chat template: use /v1/completions")


def _raw(port, data: bytes) -> bytes:
    """Send bytes on a fresh connection, read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_keep_alive_survives_errors_and_bad_lengths_close_before_any_body(served):
    _, _, expected, server = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    headers = {"Content-Type": "application/json"}
    good = json.dumps({"prompts": [PROMPT], "tokens_to_generate": NEW, "top_k": 1,
                       "budget": 0.5})
    for bad in ['{"prompts": 3}', "{broken", '{"prompts": ["x"], "n": 2}']:
        conn.request("PUT", "/api", body=bad, headers=headers)
        reply = conn.getresponse()
        assert reply.status == 400 and "message" in json.loads(reply.read())
        conn.request("PUT", "/api", body=good, headers=headers)  # same connection
        reply = conn.getresponse()
        assert reply.status == 200
        assert json.loads(reply.read())["text"][0] == PROMPT + expected[0.5].text
    conn.close()
    for length in ("-5", "abc", str(10**12)):
        out = _raw(server.port, b"PUT /api HTTP/1.1\r\nHost: x\r\nContent-Length: "
                   + length.encode() + b"\r\n\r\n")  # no body follows: nothing may wait for it
        status, _, body = out.partition(b"\r\n\r\n")
        code = 413 if length.isdigit() else 400
        assert status.startswith(b"HTTP/1.1 %d" % code) and b"Connection: close" in status
        assert "Content-Length" in json.loads(body)["message"] or "bytes" in body.decode()


def test_a_handler_exception_is_a_500_with_json_and_the_connection_stays(served, monkeypatch):
    _, _, _, server = served

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(server.catalog, "listing", broken)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", "/v1/models")
    reply = conn.getresponse()
    assert reply.status == 500
    assert json.loads(reply.read())["error"]["message"] == "RuntimeError: boom"
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_a_disconnected_client_s_generation_is_cancelled(served):
    url, generator, _, server = served
    body = json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 100, "stream": True,
                       "temperature": 0}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert s.recv(65536).startswith(b"HTTP/1.1 200")  # streaming has begun
    steps = server.scheduler.steps
    s.close()
    deadline = time.time() + 120
    while generator.live and time.time() < deadline:
        time.sleep(0.05)
    assert not generator.live and server.scheduler.steps - steps < 50  # not its 100 tokens
    status, _ = _call(url + "/api", "PUT", {"prompts": [PROMPT], "tokens_to_generate": 2})
    assert status == 200


def _start_server(path, max_seq_length=128):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tools", "run_text_generation_server.py"),
         "--load", path, "--port", "0", "--host", "127.0.0.1",
         "--inference-max-seq-length", str(max_seq_length)],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines = []
    while not lines or "serving" not in lines[-1]:
        lines.append(proc.stderr.readline())
        assert lines[-1], "".join(lines)  # the server ended before serving
    return proc, int(lines[-1].split("127.0.0.1:")[1].split(" ")[0])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_server_within_seconds_cancelling_what_is_in_flight(signum):
    _, path = smollm2_flextron()
    proc, port = _start_server(path, max_seq_length=1200)
    try:
        # counting goes on without an end token: the request outlasts the 3 s wait on any CPU
        # (a prose prompt ended at token 61, inside 3 s, once decoding got faster)
        counting = ", ".join(str(i) for i in range(1, 30)) + ","
        body = json.dumps({"prompts": [counting], "tokens_to_generate": 1000}).encode()
        replies = []

        def call():
            replies.append(_call(f"http://127.0.0.1:{port}/api", "PUT", body))

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(3)  # the request is being generated (1000 tokens take far longer)
        start = time.time()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        elapsed = time.time() - start
        thread.join()
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert elapsed < 10
    assert replies == [(503, {"message": "the server is shutting down: generation cancelled"})]


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
