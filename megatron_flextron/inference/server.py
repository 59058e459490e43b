"""A text-generation server in Megatron's request format, one model copy for every budget.

Endpoints (Megatron's ``tools/run_text_generation_server.py``; flask is not a dependency, so the
standard library's HTTP server carries them):

- ``PUT /api``: ``{"prompts": [...], "tokens_to_generate": 64, "temperature": 1.0, "top_k": 0,
  "top_p": 0.0, "random_seed": S}`` -> ``{"text": [prompt + continuation], "tokens": [prompt and
  generated ids], "architecture": [...]}``;
- ``POST /completions`` (OpenAI style): ``{"prompt": text | [texts], "max_tokens": 16,
  "temperature": 1.0 (0: greedy), "top_k", "top_p", "seed"}`` -> ``{"choices": [{"index", "text"
  (continuation), "tokens", "finish_reason", "architecture"}]}``.

Both take an added ``budget`` (a number in (0, 1]) or ``subnetwork`` (a spec) field. A bad
request gets HTTP 400 with ``{"error": message}`` and changes nothing.

Requests that arrive while a batch runs (or within ``batch_window_s`` of each other) are served
together: ``ElasticGenerator.generate`` groups them by architecture and sampling settings. Under
TP/PP rank 0 serves HTTP and broadcasts each batch; the other ranks run :func:`follow`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

import torch.distributed as dist

from megatron_flextron.inference.engine import ElasticGenerator, Request, Result, Sampling

MAX_PROMPTS = 128
MAX_BODY_BYTES = 1 << 20
_SELECTION_KEYS = ("budget", "subnetwork")


class BadRequest(ValueError):
    pass


def _field(body: dict, key: str, kinds, default):
    value = body.get(key, default)
    if value is not default and (isinstance(value, bool) or not isinstance(value, kinds)):
        raise BadRequest(f"{key} must be a {' or '.join(k.__name__ for k in kinds)}")
    return value


def _selection(body: dict) -> dict:
    return {k: body[k] for k in _SELECTION_KEYS if body.get(k) is not None}


def parse_api(generator: ElasticGenerator, body: dict) -> List[Request]:
    """Megatron's ``PUT /api`` fields (plus budget/subnetwork) -> validated requests."""
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("prompts must be a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts per request")
    if not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompts must be a non-empty list of strings")
    sampling = Sampling(
        max_new_tokens=_field(body, "tokens_to_generate", (int,), 64),
        temperature=_field(body, "temperature", (int, float), 1.0),
        top_k=_field(body, "top_k", (int,), 0),
        top_p=_field(body, "top_p", (int, float), 0.0),
        seed=_seed(body.get("random_seed")),
    )
    return [generator.request(p, sampling, **_selection(body)) for p in prompts]


def parse_completions(generator: ElasticGenerator, body: dict) -> List[Request]:
    """OpenAI ``POST /completions`` fields (plus budget/subnetwork) -> validated requests."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompt must be a string or a non-empty list of strings")
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts per request")
    temperature = _field(body, "temperature", (int, float), 1.0)
    greedy = temperature == 0  # OpenAI's way of asking for greedy decoding
    sampling = Sampling(
        max_new_tokens=_field(body, "max_tokens", (int,), 16),
        temperature=1.0 if greedy else temperature,
        top_k=1 if greedy else _field(body, "top_k", (int,), 0),
        top_p=0.0 if greedy else _field(body, "top_p", (int, float), 0.0),
        seed=_seed(body.get("seed")),
    )
    return [generator.request(p, sampling, **_selection(body)) for p in prompts]


def _seed(value) -> Optional[int]:
    if value is None or value == -1:  # Megatron: -1 = no seed
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest("the seed must be a non-negative integer")
    return value


def api_response(requests: List[Request], results: List[Result], tokenizer) -> dict:
    return {
        "text": [tokenizer.detokenize(q.prompt_tokens) + r.text for q, r in zip(requests, results)],
        "tokens": [q.prompt_tokens + r.tokens for q, r in zip(requests, results)],
        "finish_reason": [r.finish_reason for r in results],
        "architecture": [r.architecture.describe() for r in results],
    }


def completions_response(results: List[Result]) -> dict:
    return {
        "object": "text_completion",
        "choices": [
            {
                "index": i,
                "text": r.text,
                "tokens": r.tokens,
                "logprobs": None,
                "finish_reason": r.finish_reason,
                "architecture": r.architecture.describe(),
            }
            for i, r in enumerate(results)
        ],
    }


class _Job:
    def __init__(self, requests: List[Request]):
        self.requests, self.results, self.error = requests, None, None
        self.done = threading.Event()


class BatchingWorker:
    """One thread owns the model: it takes every job waiting (after a short window), runs them
    as one ``generate`` call (grouped by architecture there), and hands back each job's results."""

    def __init__(self, generator: ElasticGenerator, batch_window_s: float = 0.05):
        self.generator, self.window = generator, batch_window_s
        self.jobs: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self.batches: List[int] = []  # jobs per batch (observability, tests)

    def start(self) -> "BatchingWorker":
        self.thread.start()
        return self

    def submit(self, requests: List[Request]) -> List[Result]:
        job = _Job(requests)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.results

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                _broadcast(None)
                return
            time.sleep(self.window)
            jobs, stop = [first], False
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._run(jobs)
            if stop:
                _broadcast(None)
                return

    def _run(self, jobs: List[_Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        self.batches.append(len(jobs))
        try:
            _broadcast(requests)
            results = self.generator.generate(requests)
        except Exception as e:  # reported to every waiting client; the server keeps serving
            for job in jobs:
                job.error = e
                job.done.set()
            return
        start = 0
        for job in jobs:
            job.results = results[start : start + len(job.requests)]
            start += len(job.requests)
            job.done.set()


def _broadcast(requests) -> None:
    """Hand rank 0's batch (None: shut down) to the other model-parallel ranks."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list([requests], src=0)


def follow(generator: ElasticGenerator) -> None:
    """Ranks other than 0: run every batch rank 0 broadcasts, until it shuts down."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        try:
            generator.generate(box[0])
        except Exception:  # rank 0 hit the same error and reports it to its clients
            pass


def make_handler(generator: ElasticGenerator, worker: BatchingWorker):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self):
            if self.path.rstrip("/") != "/api":
                return self._send(404, {"error": f"no endpoint {self.path} (PUT /api)"})
            self._serve(parse_api, lambda q, r: api_response(q, r, generator.tokenizer))

        def do_POST(self):
            if self.path.rstrip("/") != "/completions":
                return self._send(404, {"error": f"no endpoint {self.path} (POST /completions)"})
            self._serve(parse_completions, lambda q, r: completions_response(r))

        def _serve(self, parse, respond):
            try:
                requests = parse(generator, self._body())
            except ValueError as e:  # BadRequest, and validation errors of the library
                return self._send(400, {"error": str(e)})
            try:
                results = worker.submit(requests)
            except ValueError as e:
                return self._send(400, {"error": str(e)})
            except Exception as e:
                return self._send(500, {"error": f"{type(e).__name__}: {e}"})
            self._send(200, respond(requests, results))

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise BadRequest(f"request body over {MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            return body

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):  # quiet: clients get every error in the response
            pass

    return Handler


class TextGenerationServer:
    """``serve_forever`` on rank 0; ``shutdown`` stops HTTP and the worker (and the followers)."""

    def __init__(
        self,
        generator: ElasticGenerator,
        host: str = "0.0.0.0",
        port: int = 5000,
        batch_window_s: float = 0.05,
    ):
        self.worker = BatchingWorker(generator, batch_window_s).start()
        self.httpd = ThreadingHTTPServer((host, port), make_handler(generator, self.worker))
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.worker.stop()
