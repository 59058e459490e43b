"""A text-generation server for one elastic model copy serving every budget.

Endpoints:

- ``PUT /api``, Megatron's format (``tools/text_generation_cli.py``): ``{"prompts": [...],
  "tokens_to_generate": 64, "temperature": 1.0, "top_k": 0, "top_p": 0.0, "random_seed": S}`` ->
  ``{"text": [prompt + continuation], "tokens": [prompt and generated ids], "finish_reason",
  "architecture"}``; errors are ``{"message": ...}``, which Megatron's client prints;
- the OpenAI-compatible API (openai_api.py): ``POST /v1/completions``,
  ``POST /v1/chat/completions`` (also without ``/v1``), ``GET /v1/models``; errors are OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``.

Requests may add ``budget`` (a number in (0, 1]) or ``subnetwork`` (an inline spec object);
OpenAI clients can name either as the model (``smollm2@0.5``). A bad request gets a 4xx naming the
problem and runs nothing. Requests join the running batch as they arrive (scheduler.py); a client
that disconnects has its generation cancelled; :meth:`TextGenerationServer.shutdown` cancels what
is in flight (their clients get 503 or a final stream error) and returns within a step.
"""

from __future__ import annotations

import queue
import threading
import time
from http.server import ThreadingHTTPServer
from typing import List

from megatron_flextron.inference import openai_api as oai
from megatron_flextron.inference.engine import ElasticGenerator, Request, Result, Sampling
from megatron_flextron.inference.http import HTTPError, JSONHandler
from megatron_flextron.inference.scheduler import Scheduler

API_FIELDS = {"prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "random_seed",
              "add_BOS", "logprobs", "budget", "subnetwork"}
POLL_S = 0.1  # how often a waiting request checks its client and the server


class ClientGone(Exception):
    pass


def parse_api(generator: ElasticGenerator, body: dict) -> List[Request]:
    """Megatron's ``PUT /api`` fields (plus budget/subnetwork) -> validated requests."""
    for key in body:
        if key not in API_FIELDS:
            raise oai.bad(f"unknown or unsupported field {key!r} for PUT /api", key)
    for key in ("add_BOS", "logprobs"):
        if body.get(key):
            raise oai.bad(f"{key}=true is not supported on PUT /api", key)
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise oai.bad("prompts must be a non-empty list of strings", "prompts")
    if len(prompts) > oai.MAX_PROMPTS:
        raise oai.bad(f"at most {oai.MAX_PROMPTS} prompts per request", "prompts")
    seed = body.get("random_seed")
    if seed == -1:  # Megatron: -1 = no seed
        seed = None
    try:
        sampling = Sampling(
            max_new_tokens=oai.field(body, "tokens_to_generate", (int,), 64),
            temperature=oai.field(body, "temperature", (int, float), 1.0),
            top_k=oai.field(body, "top_k", (int,), 0),
            top_p=oai.field(body, "top_p", (int, float), 0.0),
            seed=seed,
        )
        select = oai.selection(body)
        requests = []
        for i, prompt in enumerate(prompts):  # prompt i draws with seed + i, alone or not
            s = sampling if seed is None else Sampling(**{**sampling.__dict__, "seed": seed + i})
            requests.append(generator.request(prompt, s, **select))
        return requests
    except ValueError as e:
        raise oai.bad(str(e)) from None


def api_reply(requests: List[Request], results: List[Result], tokenizer) -> dict:
    return {
        "text": [tokenizer.detokenize(q.prompt_tokens) + r.text for q, r in zip(requests, results)],
        "tokens": [q.prompt_tokens + r.tokens for q, r in zip(requests, results)],
        "finish_reason": [r.finish_reason for r in results],
        "architecture": [r.architecture.describe() for r in results],
    }


def make_handler(server: "TextGenerationServer"):
    generator, catalog = server.generator, server.catalog
    tokenizer = generator.tokenizer

    class Handler(JSONHandler):
        def error_body(self, error: HTTPError) -> dict:
            if self.path.rstrip("/").split("?")[0] == "/api":
                return {"message": error.message}  # what Megatron's client prints
            return super().error_body(error)

        def route(self, method: str, path: str) -> None:
            if path.startswith("/v1/"):
                path = path[3:]
            if path == "/models" and method == "GET":
                return self.send_json(200, catalog.listing())
            if path.startswith("/models/") and method == "GET":
                return self.send_json(200, catalog.describe(path[len("/models/"):]))
            if path == "/health" and method == "GET":
                return self.send_json(200, {"status": "ok"})
            endpoints = {("/api", "PUT"): self._api, ("/completions", "POST"): self._completions,
                         ("/chat/completions", "POST"): self._chat}
            handler = endpoints.get((path, method))
            if handler is None:
                known = sorted(f"{m} {p}" for p, m in endpoints) + ["GET /v1/models"]
                status = 405 if any(p == path for p, _ in endpoints) else 404
                raise HTTPError(status, f"no endpoint {method} {self.path} ({', '.join(known)})",
                                kind="not_found_error")
            if server.stopping.is_set():
                raise HTTPError(503, "the server is shutting down", kind="server_error")
            handler(self.read_json())

        def _api(self, body: dict) -> None:
            requests = parse_api(generator, body)
            results = self._wait(requests)
            self.send_json(200, api_reply(requests, results, tokenizer))

        def _completions(self, body: dict) -> None:
            self._openai(body, oai.parse_completions, oai.completion_reply, "cmpl", chat=False)

        def _chat(self, body: dict) -> None:
            self._openai(body, oai.parse_chat, oai.chat_reply, "chatcmpl", chat=True)

        def _openai(self, body, parse, reply, prefix: str, chat: bool) -> None:
            requests = parse(generator, catalog, body)
            n = oai._n(body)
            meta = (oai.new_id(prefix), body.get("model") or catalog.name, int(time.time()))
            stream = oai.field(body, "stream", (bool,), False)
            options = oai.field(body, "stream_options", (dict,), {})
            if options and (not stream or set(options) - {"include_usage"}):
                raise oai.bad("stream_options takes include_usage, with stream: true",
                              "stream_options")
            if not stream:
                results = self._wait(requests)
                return self.send_json(200, reply(meta, tokenizer, requests, results, n))
            self._stream(requests, meta, chat, n, bool(options.get("include_usage")))

        # ---- waiting on the scheduler ------------------------------------------------------
        def _updates(self, requests: List[Request]):
            """(index, update) as the scheduler produces them; cancels everything if the client
            goes away (ClientGone) and ends when every request has its result."""
            sink: "queue.Queue" = queue.Queue()
            handles = server.scheduler.submit(requests, sink)
            index = {h.rid: i for i, h in enumerate(handles)}
            pending = set(index)
            try:
                while pending:
                    try:
                        rid, update, error = sink.get(timeout=POLL_S)
                    except queue.Empty:
                        if self.client_gone():
                            raise ClientGone() from None
                        continue
                    if error is not None:
                        raise error
                    if update.result is not None:
                        pending.discard(rid)
                    yield index[rid], update
            finally:
                if pending:
                    server.scheduler.cancel([h for h in handles if h.rid in pending])

        def _wait(self, requests: List[Request]) -> List[Result]:
            results = [None] * len(requests)
            updates = self._updates(requests)
            try:
                for i, update in updates:
                    if update.result is not None:
                        results[i] = update.result
            except ClientGone:
                self.close_connection = True
                raise ConnectionResetError() from None
            except ValueError as e:
                raise oai.bad(str(e)) from None
            finally:
                updates.close()  # cancels what is left
            if any(r.finish_reason == "cancelled" for r in results):
                raise HTTPError(503, "the server is shutting down: generation cancelled",
                                kind="server_error")
            return results

        def _stream(self, requests, meta, chat: bool, n: int, include_usage: bool) -> None:
            self.start_stream()
            results = [None] * len(requests)
            started = set()
            updates = self._updates(requests)
            try:
                for i, update in updates:
                    result = update.result
                    if result is not None and result.finish_reason == "cancelled":
                        raise HTTPError(503, "the server is shutting down: generation cancelled",
                                        kind="server_error")
                    if chat:
                        chunk = oai.chat_chunk(meta, tokenizer, i, update, result,
                                               i not in started)
                    else:
                        chunk = oai.completion_chunk(meta, tokenizer, i, update, result)
                    started.add(i)
                    if update.text or update.tokens or result is not None or chat:
                        self.send_event(chunk)
                    if result is not None:
                        results[i] = result
            except ClientGone:
                self.close_connection = True
                return
            finally:
                updates.close()  # cancels what is left (a client gone mid-write included)
            if include_usage:
                rid, model, created = meta
                self.send_event({"id": rid, "object": "chat.completion.chunk" if chat else
                                 "text_completion", "created": created, "model": model,
                                 "choices": [], "usage": oai.usage(requests, results, n)})
            self.end_stream()

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the library's 5 resets a burst of concurrent clients


class TextGenerationServer:
    """``serve_forever`` on rank 0; ``shutdown`` cancels in-flight requests and stops HTTP, the
    scheduler and the other ranks."""

    def __init__(self, generator: ElasticGenerator, host: str = "0.0.0.0", port: int = 5000,
                 model_name: str = "model"):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not in [0, 65535]")
        self.generator = generator
        self.catalog = oai.ModelCatalog(model_name, generator)
        self.stopping = threading.Event()
        self.scheduler = Scheduler(generator).start()
        try:
            self.httpd = _HTTPServer((host, port), make_handler(self))
        except OSError as e:
            self.scheduler.stop()
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._closed, self._closing = False, threading.Lock()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.1)

    def shutdown(self) -> None:
        """Cancel what is in flight (clients get 503), stop accepting, stop the loop (and the
        other ranks). From any thread but the serving one; a second call waits for the first."""
        with self._closing:
            if self._closed:
                return
            self.stopping.set()
            self.scheduler.stop()
            self.httpd.shutdown()
            time.sleep(3 * POLL_S)  # handler threads answer their cancelled requests
            self.httpd.server_close()
            self._closed = True
