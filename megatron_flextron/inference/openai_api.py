"""The OpenAI-compatible API: request fields -> validated requests, results -> OpenAI replies.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (the tokenizer's chat template), with
``stream``, ``n``, ``seed``, ``stop``, ``logprobs`` and ``usage``; ``GET /v1/models`` lists every
budget and named sub-network as a model id (``smollm2``, ``smollm2@0.5``,
``smollm2@mlp768-heads6``; a mixture of experts: ``qwen3moe@experts4-moe_ffn16-topk1-heads4``),
so any OpenAI client picks one by ``model``. The ``budget`` and ``subnetwork`` body fields (and
``top_k``) are accepted as well. A field this server does not know or does not support is a 400
naming it: nothing is silently ignored.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import List, Optional, Tuple

from megatron_flextron.inference.engine import (
    MAX_LOGPROBS,
    ElasticGenerator,
    Request,
    Result,
    Sampling,
)
from megatron_flextron.inference.http import HTTPError

MAX_PROMPTS = 128
MAX_N = 16
_SUBNET_ID = re.compile(r"^mlp(?P<mlp>\d+)-heads(?P<heads>\d+)(?:-layers(?P<layers>\d+))?$")
_MOE_SUBNET_ID = re.compile(r"^experts(?P<experts>\d+)-moe_ffn(?P<moe_ffn>\d+)-topk(?P<topk>\d+)"
                            r"(?:-heads(?P<heads>\d+))?(?:-layers(?P<layers>\d+))?$")

# fields accepted only at their no-op value: anything else is a 400 saying so
_NO_OP = {"echo": False, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
          "best_of": 1, "suffix": None, "response_format": {"type": "text"}, "tools": [],
          "tool_choice": "none", "parallel_tool_calls": None}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
           "stop", "seed", "top_k", "budget", "subnetwork", "user", "presence_penalty",
           "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens",
                         "response_format", "tools", "tool_choice", "parallel_tool_calls"}


def bad(message: str, param: Optional[str] = None, status: int = 400) -> HTTPError:
    return HTTPError(status, message, param)


def check_fields(body: dict, allowed, where: str) -> None:
    """Unknown fields, and supported-only-as-no-op fields set to something else, are refused."""
    for key in body:
        if key not in allowed:
            raise bad(f"unknown or unsupported field {key!r} for {where}", key)
    for key, value in _NO_OP.items():
        if key in body and body[key] is not None and body[key] != value:
            raise bad(f"{key}={body[key]!r} is not supported (only {value!r})", key)


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
               str: "a string", list: "a list"}


def field(body: dict, key: str, kinds, default, check=None, what: str = ""):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise bad(f"{key} must be {names}{what}, got {value!r}", key)
    if check is not None and not check(value):
        raise bad(f"{key} must be {what.strip(', ')}, got {value!r}", key)
    return value


def selection(body: dict) -> dict:
    """The budget / subnetwork body fields. A sub-network is an inline object, never a path."""
    out = {}
    if body.get("budget") is not None:
        out["budget"] = body["budget"]
    if body.get("subnetwork") is not None:
        if not isinstance(body["subnetwork"], dict):
            raise bad("subnetwork must be an inline JSON object such as "
                      '{"mlp": 768, "heads": 6}', "subnetwork")
        out["subnetwork"] = body["subnetwork"]
    return out


class ModelCatalog:
    """Model ids: ``name`` (the full model, or the policy's default), ``name@B`` per budget,
    ``name@mlpM-headsH[-layersL]`` per named sub-network; a mixture of experts names its
    sub-networks ``name@expertsE-moe_ffnF-topkK[-headsH][-layersL]`` (the spec's keys)."""

    def __init__(self, name: str, generator: ElasticGenerator):
        self.name, self.generator = name, generator
        sel = generator.selector
        m, e = sel.model_config, sel.elastic
        mlp, heads = e.choices_with_full(m)
        budgets = getattr(sel.policy, "budgets", None)
        if m.is_moe:
            experts, widths, topks = e.moe_choices_with_full(m)
            if not budgets:  # the expert width ratios, as the MLP ratios of a dense model
                budgets = sorted({round(w / m.moe_ffn_hidden_size, 4) for w in widths},
                                 reverse=True)
            self.subnetworks = [f"experts{x}-moe_ffn{w}-topk{k}-heads{h}" for x in experts
                                for w in widths for k in topks if k <= x for h in heads]
        else:
            if not budgets:
                budgets = sorted({round(w / m.ffn_hidden_size, 4) for w in mlp}, reverse=True)
            self.subnetworks = [f"mlp{w}-heads{h}" for w in mlp for h in heads]
        self.budgets = [float(b) for b in budgets]
        self.created = int(time.time())

    def ids(self) -> List[str]:
        return ([self.name] + [f"{self.name}@{b:g}" for b in self.budgets]
                + [f"{self.name}@{s}" for s in self.subnetworks])

    def listing(self) -> dict:
        return {"object": "list", "data": [self.describe(i) for i in self.ids()]}

    def describe(self, model_id: str) -> dict:
        self.resolve(model_id)
        return {"id": model_id, "object": "model", "created": self.created,
                "owned_by": "megatron-flextron"}

    def resolve(self, model_id) -> dict:
        """The selection a model id names (404 when it names none)."""
        if model_id is None:
            return {}
        if not isinstance(model_id, str):
            raise bad(f"model must be a string, got {model_id!r}", "model")
        base, _, which = model_id.partition("@")
        if base != self.name:
            raise HTTPError(404, f"model {model_id!r} does not exist (GET /v1/models lists them)",
                            "model", "model_not_found")
        if not which:
            return {}
        try:
            return {"budget": float(which)}
        except ValueError:
            pass
        for pattern in (_SUBNET_ID, _MOE_SUBNET_ID):
            match = pattern.match(which)
            if match:
                return {"subnetwork": {k: int(v) for k, v in match.groupdict().items()
                                       if v is not None}}
        raise HTTPError(404, f"model {model_id!r} does not exist: after '@' comes a budget "
                        "(0.5), mlpM-headsH[-layersL] or expertsE-moe_ffnF-topkK[-headsH]"
                        "[-layersL]", "model", "model_not_found")


def _sampling_fields(body: dict, max_tokens: int, logprobs: Optional[int]) -> Sampling:
    temperature = field(body, "temperature", (int, float), 1.0, lambda t: 0 <= t <= 2,
                        ", a number in [0, 2]")
    top_p = field(body, "top_p", (int, float), 1.0, lambda p: 0 < p <= 1, ", a number in (0, 1]")
    top_k = field(body, "top_k", (int,), 0)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if stop is not None and (not stops or not all(isinstance(s, str) and s for s in stops)
                             or len(stops) > 4):
        raise bad("stop must be a string or a list of at most 4 non-empty strings", "stop")
    seed = field(body, "seed", (int,), None, lambda s: 0 <= s < 2**63, ", an integer >= 0")
    greedy = temperature == 0  # OpenAI's way of asking for greedy decoding
    try:
        return Sampling(
            max_new_tokens=max_tokens,
            temperature=1.0 if greedy else temperature,
            top_k=1 if greedy else top_k,
            top_p=0.0 if greedy or top_p == 1 else top_p,
            seed=seed,
            logprobs=logprobs,
            stop=stops,
        )
    except ValueError as e:
        raise bad(str(e)) from None


def _n(body: dict) -> int:
    return field(body, "n", (int,), 1, lambda n: 1 <= n <= MAX_N, f", an integer in [1, {MAX_N}]")


def _requests(generator, prompts, sampling: Sampling, n: int, select: dict) -> List[Request]:
    """Each prompt n times; copy j of a seeded request draws with seed + j."""
    out = []
    for prompt in prompts:
        for j in range(n):
            s = sampling
            if s.seed is not None and j:
                s = Sampling(**{**s.__dict__, "seed": (s.seed + j) % 2**63})
            try:
                out.append(generator.request(prompt, s, **select))
            except ValueError as e:
                raise bad(str(e)) from None
    return out


def _select(catalog: ModelCatalog, body: dict) -> dict:
    chosen = catalog.resolve(body.get("model"))
    extra = selection(body)
    if chosen and extra:
        raise bad(f"model {body['model']!r} already names a sub-network: leave out "
                  f"{'/'.join(extra)}", next(iter(extra)))
    return chosen or extra


def parse_completions(generator, catalog: ModelCatalog, body: dict) -> List[Request]:
    check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    else:
        prompts = prompt
    if not isinstance(prompts, list) or not prompts or not all(
        isinstance(p, (str, list)) for p in prompts
    ):
        raise bad("prompt must be a string, a list of strings or a list of token-id lists",
                  "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    max_tokens = field(body, "max_tokens", (int,), 16)
    logprobs = field(body, "logprobs", (int,), None, lambda n: 0 <= n <= MAX_LOGPROBS,
                     f", an integer in [0, {MAX_LOGPROBS}]")
    sampling = _sampling_fields(body, max_tokens, logprobs)
    return _requests(generator, prompts, sampling, _n(body), _select(catalog, body))


def render_chat(generator: ElasticGenerator, messages) -> str:
    """The conversation through the tokenizer's chat template, ready for the assistant's turn."""
    template = getattr(generator, "chat_template", None)
    if not template:
        raise bad("this model's tokenizer has no chat template: use /v1/completions", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise bad(f"messages[{i}] must be an object with role and content only", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role {role!r} is not system, user or assistant", "messages")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=clean, add_generation_prompt=True)
    except Exception as e:  # a template that rejects this conversation (e.g. role order)
        raise bad(f"the chat template refused the messages: {e}", "messages") from None


def parse_chat(generator, catalog: ModelCatalog, body: dict) -> List[Request]:
    check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    prompt = render_chat(generator, body.get("messages"))
    max_tokens = field(body, "max_completion_tokens", (int,), None)
    max_tokens = field(body, "max_tokens", (int,), 16 if max_tokens is None else max_tokens)
    want = field(body, "logprobs", (bool,), False)
    top = field(body, "top_logprobs", (int,), None, lambda n: 0 <= n <= MAX_LOGPROBS,
                f", an integer in [0, {MAX_LOGPROBS}]")
    if top is not None and not want:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    sampling = _sampling_fields(body, max_tokens, (top or 0) if want else None)
    return _requests(generator, [prompt], sampling, _n(body), _select(catalog, body))


# ---- replies ---------------------------------------------------------------------------------
def finish_reason(result: Result) -> str:
    return {"eod": "stop", "stop": "stop", "length": "length"}.get(result.finish_reason,
                                                                   result.finish_reason)


def usage(requests: List[Request], results: List[Result], n: int) -> dict:
    prompt = sum(len(r.prompt_tokens) for r in requests[::n])
    completion = sum(len(r.tokens) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_logprobs(tokenizer, tokens, logprobs, top) -> Optional[dict]:
    if logprobs is None:
        return None
    strings = [tokenizer.detokenize([t]) for t in tokens]
    offsets, at = [], 0
    for s in strings:
        offsets.append(at)
        at += len(s)
    return {"tokens": strings, "token_logprobs": logprobs,
            "top_logprobs": [{tokenizer.detokenize([i]): v for i, v in pairs} for pairs in top],
            "text_offset": offsets}


def chat_logprobs(tokenizer, tokens, logprobs, top) -> Optional[dict]:
    if logprobs is None:
        return None

    def entry(token, value):
        text = tokenizer.detokenize([token])
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {"content": [{**entry(t, v), "top_logprobs": [entry(i, w) for i, w in pairs]}
                        for t, v, pairs in zip(tokens, logprobs, top)]}


def completion_reply(meta: Tuple[str, str, int], tokenizer, requests, results, n) -> dict:
    rid, model, created = meta
    choices = [{
        "index": i, "text": r.text, "finish_reason": finish_reason(r),
        "logprobs": completion_logprobs(tokenizer, r.tokens, r.logprobs, r.top_logprobs),
        "tokens": r.tokens, "architecture": r.architecture.describe(),
    } for i, r in enumerate(results)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage(requests, results, n)}


def chat_reply(meta: Tuple[str, str, int], tokenizer, requests, results, n) -> dict:
    rid, model, created = meta
    choices = [{
        "index": i, "message": {"role": "assistant", "content": r.text},
        "finish_reason": finish_reason(r),
        "logprobs": chat_logprobs(tokenizer, r.tokens, r.logprobs, r.top_logprobs),
        "architecture": r.architecture.describe(),
    } for i, r in enumerate(results)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(requests, results, n)}


def completion_chunk(meta, tokenizer, index: int, update, result: Optional[Result]) -> dict:
    rid, model, created = meta
    lp = None
    if update.logprobs or (result is not None and result.logprobs is not None):
        lp = completion_logprobs(tokenizer, update.tokens, update.logprobs, update.top_logprobs)
    choice = {"index": index, "text": update.text, "logprobs": lp,
              "finish_reason": finish_reason(result) if result else None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice]}


def chat_chunk(meta, tokenizer, index: int, update, result: Optional[Result],
               first: bool) -> dict:
    rid, model, created = meta
    delta = {"role": "assistant", "content": update.text} if first else {"content": update.text}
    lp = None
    if update.logprobs or (result is not None and result.logprobs is not None):
        lp = chat_logprobs(tokenizer, update.tokens, update.logprobs, update.top_logprobs)
    choice = {"index": index, "delta": delta, "logprobs": lp,
              "finish_reason": finish_reason(result) if result else None}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}
