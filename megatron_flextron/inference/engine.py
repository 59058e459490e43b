"""Generation on megatron-core's dynamic inference engine, one elastic model copy for every budget.

megatron-core's pieces, unchanged: ``GPTInferenceWrapper`` over the elastic model, a
``DynamicInferenceContext`` (paged KV cache), ``TextGenerationController`` (prefill and decode
steps over a changing set of requests) and ``DynamicInferenceEngine`` (continuous batching:
requests join the running batch at the next step and leave it when done).

One engine step runs one sub-network, so every architecture in use gets its own lane (an engine
and its KV cache, created on first use, the least recently used idle one dropped beyond
``max_lanes``); :meth:`ElasticGenerator.step` runs one step of the next lane with work, round
robin, with the shared weights set to that lane's architecture (prefix views, no copy). Within a
lane, requests batch continuously; across lanes, steps interleave, so a short request never
waits for a long one to end.

Sampling is per request (:class:`SamplingController`): each request draws from its own seeded
generator, so a seeded request gives the same tokens alone and in any batch, and reports the log
probabilities of what it drew. Generation stops at every end token of the checkpoint (its EOD and
the ones its tokenizer / generation config name), at stop strings, or at its length.

Under TP/PP every rank makes the same calls in the same order (scheduler.py broadcasts them).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_flextron.compat.inference import apply_inference_shims
from megatron_flextron.inference.subnetworks import Architecture, SubnetworkSelector

MAX_LOGPROBS = 5


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling. ``top_k=1`` is greedy; ``seed`` fixes the draws; ``logprobs``: how
    many alternatives to report per token (None: no log probabilities); ``stop``: strings that
    end generation (left out of the text)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    stop: Tuple[str, ...] = ()

    def __post_init__(self):
        n, t, k, p = self.max_new_tokens, self.temperature, self.top_k, self.top_p
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of tokens to generate must be an integer >= 1, got {n!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 100:
            raise ValueError(f"temperature must be a number in (0, 100], got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 1000:
            raise ValueError(f"top_k must be an integer in [0, 1000], got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"top_p must be a number in [0, 1], got {p!r}")
        if k > 0 and p > 0:
            raise ValueError("set either top_k or top_p, not both")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {s!r}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)
                               or not 0 <= lp <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}")
        if not isinstance(self.stop, tuple) or len(self.stop) > 4 or not all(
            isinstance(x, str) and x for x in self.stop
        ):
            raise ValueError("stop must be at most 4 non-empty strings")

    @classmethod
    def greedy(cls, max_new_tokens: int = 32) -> "Sampling":
        return cls(max_new_tokens=max_new_tokens, top_k=1)

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1


@dataclass
class Request:
    prompt_tokens: List[int]
    sampling: Sampling
    architecture: Architecture


@dataclass
class Result:
    text: str  # the continuation only (a stop string and what follows it left out)
    tokens: List[int]  # generated ids (an end token that stopped generation left out)
    finish_reason: str  # "eod" (an end token), "stop" (a stop string), "length", "cancelled"
    architecture: Architecture
    logprobs: Optional[List[float]] = None  # per generated token
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            **self.architecture.describe(),
        }


@dataclass
class Update:
    """What one step did to one request: its new text (held back while it may still become a
    stop string or an incomplete character), and the result once it is finished."""

    rid: int
    text: str = ""
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)
    result: Optional[Result] = None


class EngineTokenizer:
    """The tokenizer interface megatron's controller reads (tokenize, detokenize, eod, bos)."""

    def __init__(self, tokenizer, end_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.eod, self.bos = tokenizer.eod, None
        self.vocab_size = tokenizer.vocab_size
        self.extra_end_ids = frozenset(end_ids)

    @property
    def end_ids(self) -> frozenset:
        return self.extra_end_ids | {self.eod}

    def tokenize(self, text: str) -> List[int]:
        return self._tok.tokenize(text)

    def detokenize(self, ids, **_kwargs) -> str:
        return self._tok.detokenize([int(i) for i in ids])

    def offsets(self, ids, text):  # megatron asks for it when segments are requested
        return []


def sample_row(logits: torch.Tensor, sampling: Sampling, generator) -> int:
    """One token from one request's logits [vocab]: greedy, or temperature / top-k / top-p."""
    if sampling.is_greedy:
        return int(logits.argmax())
    x = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(x, sampling.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p > 0:
        ordered, order = torch.sort(x, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest set above top_p
        x = x.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1).to("cpu")
    return int(torch.multinomial(probs, 1, generator=generator))


@functools.lru_cache(maxsize=1)
def _controller_class():
    """megatron's ``TextGenerationController`` with per-request sampling (a subclass of the
    installed megatron's controller, built on first use)."""
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class SamplingController(TextGenerationController):
        """Samples each active request with its own settings and generator, and records the
        drawn token (and its log probabilities) per request id for :class:`ElasticGenerator`.
        A request finished here but still in megatron's batch draws EOD, so it leaves."""

        def __init__(self, wrapped, tokenizer, live: Dict[int, "_Live"]):
            super().__init__(wrapped, tokenizer)
            self.live, self.drawn = live, {}

        def _dynamic_step_sample_logits(self):
            context = self.inference_wrapped_model.inference_context
            start, end = context.paused_request_count, context.total_request_count
            ids = context.request_ids[start:end].tolist()
            logits = self._all_logits_cuda.squeeze(0)[: len(ids), : self.tokenizer.vocab_size]
            for row, rid in enumerate(ids):
                live = self.live.get(rid)
                if live is None:
                    self._sampled_tokens_cuda[row] = self.tokenizer.eod
                    continue
                sampling = live.request.sampling
                token = sample_row(logits[row], sampling, live.generator)
                self._sampled_tokens_cuda[row] = token
                logp = top = None
                if sampling.logprobs is not None:
                    all_logp = logits[row].float().log_softmax(-1)
                    best = torch.topk(all_logp, sampling.logprobs)
                    logp = float(all_logp[token])
                    top = list(zip(best.indices.tolist(), best.values.tolist()))
                self.drawn[rid] = (token, logp, top)

    return SamplingController


@contextlib.contextmanager
def _inference_mode():
    """megatron's process-wide "an engine uses the model" flag, only while one does (its engine
    sets it for good, which would change every later forward pass of the process)."""
    from megatron.core.inference.utils import InferenceMode

    InferenceMode.set_active()
    try:
        yield
    finally:
        InferenceMode.unset_active()


class _Live:
    """A request in flight: what it generated so far and what its client has been sent."""

    def __init__(self, request: Request, seed: int, lane: "_Lane"):
        self.request, self.lane = request, lane
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.top_logprobs: List[List[Tuple[int, float]]] = []
        self.sent_tokens = 0
        self.sent_text = ""
        self.done = False


class _Lane:
    """One architecture's engine: megatron's dynamic context (KV cache), controller and engine."""

    def __init__(self, model, tokenizer, arch: Architecture, live, max_requests, max_len):
        from megatron.core.inference.config import InferenceConfig
        from megatron.core.inference.contexts import DynamicInferenceContext
        from megatron.core.inference.engines import DynamicInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
            GPTInferenceWrapper,
        )

        cfg = model.config
        block = 16
        per_token = 2 * cfg.num_layers * (cfg.num_query_groups or cfg.num_attention_heads) * (
            cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        ) * torch.finfo(cfg.params_dtype).bits // 8
        blocks = max_requests * (-(-max_len // block) + 1) + 2  # every request at full length
        config = InferenceConfig(
            max_sequence_length=max_len,
            buffer_size_gb=blocks * block * per_token / 2**30,
            max_requests=max_requests,
            max_tokens=max(max_len, 256) + max_requests,  # a full prompt plus every decode
            block_size_tokens=block,
            num_cuda_graphs=None,
            unified_memory_level=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of the GPT path
            self.context = DynamicInferenceContext(model_config=cfg, inference_config=config)
            wrapped = GPTInferenceWrapper(model, self.context)
            self.controller = _controller_class()(wrapped, tokenizer, live)
            self.engine = DynamicInferenceEngine(self.controller, self.context)
        self.arch = arch
        self.rids: set = set()


class ElasticGenerator:
    """megatron's dynamic engine over one elastic model; sub-network chosen per request."""

    def __init__(
        self,
        model,
        tokenizer,
        selector: SubnetworkSelector,
        max_batch_size: int = 8,
        max_sequence_length: int = 1024,
        end_ids: Sequence[int] = (),
        max_lanes: int = 4,
    ):
        apply_inference_shims()
        m = selector.model_config
        limit = m.max_position_embeddings if m.position_embedding != "rope" else None
        if limit is not None and max_sequence_length > limit:
            raise ValueError(
                f"max sequence length {max_sequence_length} exceeds the model's "
                f"{limit} learned positions"
            )
        logging.getLogger("megatron.core.inference").setLevel(logging.WARNING)
        self.model, self.selector = model, selector
        self.tokenizer = EngineTokenizer(tokenizer, end_ids)
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length
        self.max_lanes = max_lanes
        self.live: Dict[int, _Live] = {}
        self.lanes: "OrderedDict[tuple, _Lane]" = OrderedDict()
        self._turn = 0
        self._ids = itertools.count()
        self._held = contextlib.ExitStack()  # the architecture the model is set to between steps
        self._held_key: Optional[tuple] = None
        self.chat_template: Optional[str] = None  # the tokenizer's, for chat requests

    # ---- requests -------------------------------------------------------------------------
    def request(self, prompt, sampling: Sampling, subnetwork=None, budget=None) -> Request:
        """Validate one request (ValueError names the problem): prompt text or token ids."""
        if isinstance(prompt, str):
            tokens = self.tokenizer.tokenize(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            tokens = list(prompt)
            if any(not 0 <= t < self.tokenizer.vocab_size for t in tokens):
                raise ValueError(f"prompt token ids must lie in [0, {self.tokenizer.vocab_size})")
        else:
            raise ValueError("a prompt is a string or a list of token ids")
        if not tokens:
            raise ValueError("the prompt is empty")
        total = len(tokens) + sampling.max_new_tokens
        if total > self.max_sequence_length:
            raise ValueError(
                f"prompt ({len(tokens)} tokens) + tokens to generate ({sampling.max_new_tokens}) "
                f"= {total} exceeds the maximum sequence length {self.max_sequence_length}"
            )
        if sampling.top_k > self.tokenizer.vocab_size:
            raise ValueError(f"top_k {sampling.top_k} exceeds the vocabulary")
        arch = self.selector.resolve(subnetwork=subnetwork, budget=budget)
        return Request(tokens, sampling, arch)

    def new_id(self) -> int:
        return next(self._ids)

    # ---- continuous batching: what the scheduler calls, identically on every rank ----------
    def add(self, rid: int, request: Request, seed: int) -> None:
        """Queue a request: it joins its architecture's running batch at that lane's next step."""
        from megatron.core.inference.sampling_params import SamplingParams

        lane = self._lane(request.architecture)
        self.live[rid] = _Live(request, seed, lane)
        lane.rids.add(rid)
        params = SamplingParams(
            top_k=1,  # the controller samples per request (SamplingController)
            num_tokens_to_generate=request.sampling.max_new_tokens,
            termination_id=self.tokenizer.eod,
        )
        lane.engine.add_request(rid, list(request.prompt_tokens), params)

    def cancel(self, rid: int) -> Optional[Update]:
        """Finish a request now ("cancelled"); its lane drops it at its next step."""
        live = self.live.get(rid)
        if live is None or live.done:
            return None
        return self._finish(rid, live, "cancelled")

    def reset(self) -> None:
        """Drop every request and lane (after an error left them in an unknown state)."""
        self.release()
        self.live.clear()
        self.lanes.clear()

    def release(self) -> None:
        """Set the model back to the full model (it keeps a lane's architecture while busy)."""
        self._held_key = None
        self._held.close()

    def _hold(self, arch: Architecture) -> None:
        """The model runs ``arch`` until another architecture or :meth:`release`: switching costs
        a pass over every layer, so consecutive steps of one lane switch once."""
        if self._held_key != arch.key:
            self.release()
            self._held.enter_context(self.selector.active(self.model, arch))
            self._held_key = arch.key

    @property
    def busy(self) -> bool:
        return any(lane.engine.has_unfinished_requests() for lane in self.lanes.values())

    def step(self) -> List[Update]:
        """One engine step of the next lane with work (round robin); what it did per request."""
        lanes = [lane for lane in self.lanes.values() if lane.engine.has_unfinished_requests()]
        if not lanes:
            return []
        lane = lanes[self._turn % len(lanes)]
        self._turn += 1
        lane.controller.drawn = {}
        try:
            self._hold(lane.arch)
            with _inference_mode():
                lane.engine.step_modern()
        except BaseException:
            self.release()
            raise
        updates = []
        for rid, (token, logp, top) in lane.controller.drawn.items():
            live = self.live.get(rid)
            if live is None or live.done:
                continue
            updates.append(self._advance(rid, live, token, logp, top))
        for rid in list(lane.rids):
            live = self.live.get(rid)
            if live is None:
                lane.rids.discard(rid)
            elif rid not in lane.engine.requests:  # megatron ended it (its own length / EOD)
                full = len(live.tokens) >= live.request.sampling.max_new_tokens
                updates.append(self._finish(rid, live, "length" if full else "eod"))
        if not self.busy:
            self.release()
        return updates

    def _advance(self, rid, live: _Live, token, logp, top) -> Update:
        if token in self.tokenizer.end_ids:
            return self._finish(rid, live, "eod")
        live.tokens.append(token)
        if logp is not None:
            live.logprobs.append(logp)
            live.top_logprobs.append(top)
        text = self._text(live)
        stops = [text.find(s) for s in live.request.sampling.stop if s in text]
        if stops:
            return self._finish(rid, live, "stop", text[: min(stops)])
        if len(live.tokens) >= live.request.sampling.max_new_tokens:
            return self._finish(rid, live, "length")
        return self._emit(rid, live, text, final=False)

    def _text(self, live: _Live) -> str:
        prompt = live.request.prompt_tokens
        prompt_text = self.tokenizer.detokenize(prompt)
        full = self.tokenizer.detokenize(prompt + live.tokens)
        if full.startswith(prompt_text):
            return full[len(prompt_text) :]
        return self.tokenizer.detokenize(live.tokens)

    def _emit(self, rid, live: _Live, text: str, final: bool) -> Update:
        safe = len(text)
        if not final:  # hold back an incomplete character and a possible start of a stop string
            while safe and text[safe - 1] == "\ufffd":
                safe -= 1
            for s in live.request.sampling.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[safe - k : safe] == s[:k]:
                        safe -= k
                        break
        if not text.startswith(live.sent_text):  # detokenization changed earlier text
            safe = len(live.sent_text)
        new = text[len(live.sent_text) : safe] if safe > len(live.sent_text) else ""
        update = Update(
            rid, new, live.tokens[live.sent_tokens :], live.logprobs[live.sent_tokens :],
            live.top_logprobs[live.sent_tokens :],
        )
        live.sent_text += new
        live.sent_tokens = len(live.tokens)
        return update

    def _finish(self, rid, live: _Live, reason: str, text: Optional[str] = None) -> Update:
        text = self._text(live) if text is None else text
        update = self._emit(rid, live, text, final=True)
        lp = live.request.sampling.logprobs is not None
        update.result = Result(
            text, list(live.tokens), reason, live.request.architecture,
            list(live.logprobs) if lp else None, list(live.top_logprobs) if lp else None,
        )
        live.done = True
        engine = live.lane.engine
        if rid in engine.requests:  # still in megatron's batch: it leaves at the next step
            engine.stop_word_finished_request_ids.add(rid)
        del self.live[rid]
        return update

    def _lane(self, arch: Architecture) -> _Lane:
        lane = self.lanes.get(arch.key)
        if lane is None:
            idle = [k for k, v in self.lanes.items() if not v.engine.has_unfinished_requests()]
            while len(self.lanes) >= self.max_lanes and idle:
                del self.lanes[idle.pop(0)]
            with _inference_mode():
                lane = _Lane(self.model, self.tokenizer, arch, self.live, self.max_batch_size,
                             self.max_sequence_length)
            self.lanes[arch.key] = lane
        self.lanes.move_to_end(arch.key)
        return lane

    # ---- a whole batch at once (tools/generate.py, tests) ----------------------------------
    def generate(self, requests: Sequence[Request], seeds: Optional[Sequence[int]] = None
                 ) -> List[Result]:
        """Results in request order: every request joins at once, steps run until all are done.
        Unseeded sampled requests draw from ``seeds`` (or a shared random seed per request)."""
        if seeds is None:
            seeds = [r.sampling.seed if r.sampling.seed is not None else shared_seed()
                     for r in requests]
        rids = [self.new_id() for _ in requests]
        for rid, request, seed in zip(rids, requests, seeds):
            self.add(rid, request, seed)
        results: Dict[int, Result] = {}
        while len(results) < len(rids):
            for update in self.step():
                if update.result is not None:
                    results[update.rid] = update.result
        self.release()  # the full model afterwards, even while megatron still drops the last
        return [results[rid] for rid in rids]


def shared_seed() -> int:
    """A random seed, the same on every rank (rank 0 draws it)."""
    import torch.distributed as dist

    box = [random.SystemRandom().randrange(2**63)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def end_token_ids(ckpt_dir: str, tokenizer) -> List[int]:
    """Every end token the checkpoint names: its tokenizer config's ``eos_token`` and its
    generation config's ``eos_token_id`` (an id or a list), besides the tokenizer's EOD."""
    import json
    import os

    ids = []
    for folder in (ckpt_dir, os.path.join(ckpt_dir, "tokenizer")):
        gen = os.path.join(folder, "generation_config.json")
        if os.path.isfile(gen):
            with open(gen) as f:
                eos = json.load(f).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    config = os.path.join(ckpt_dir, "tokenizer", "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            eos = json.load(f).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            ids += [i for i in [tokenizer.vocab.get(eos)] if i is not None]
    return sorted({int(i) for i in ids})


def build_generator(
    ckpt_dir: str,
    router: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    max_batch_size: int = 8,
    max_sequence_length: int = 1024,
) -> ElasticGenerator:
    """Load a flextron checkpoint on this rank (model parallel already initialised) and wrap it
    with its own tokenizer and end tokens."""
    import os

    from megatron_flextron.data.tokenizer import build_tokenizer
    from megatron_flextron.inference.subnetworks import load_served_model

    tokenizer_dir = os.path.join(ckpt_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"{ckpt_dir} has no tokenizer/ folder: cannot generate text")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    model, selector = load_served_model(ckpt_dir, dtype, router)
    end_ids = end_token_ids(ckpt_dir, tokenizer)
    generator = ElasticGenerator(
        model, tokenizer, selector, max_batch_size, max_sequence_length, end_ids
    )
    generator.chat_template = chat_template(tokenizer_dir)
    return generator


def chat_template(tokenizer_dir: str) -> Optional[str]:
    """The tokenizer's chat template (chat_template.jinja or tokenizer_config.json), or None."""
    import json
    import os

    path = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read()
    config = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config) as f:
            template = json.load(f).get("chat_template")
        return template if isinstance(template, str) else None
    return None
