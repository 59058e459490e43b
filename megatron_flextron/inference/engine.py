"""Generation on megatron-core's inference stack with one elastic model copy for every budget.

megatron-core's pieces, unchanged: ``GPTInferenceWrapper`` over the elastic ``GPTModel``, a
``StaticInferenceContext`` (the KV cache), ``TextGenerationController`` (prefill, decode steps,
greedy / temperature / top-k / top-p sampling, stop at EOD) and ``StaticInferenceEngine`` (the
request scheduler, batches of up to ``max_batch_size``). The engine runs one sub-network per
batch, so :meth:`ElasticGenerator.generate` groups requests by architecture and sampling settings
and switches the shared weights (prefix views, no copy) between groups. The KV cache is allocated
once and reused by every group (GQA keeps its layout at every head count: subnetworks.py).

Under TP/PP every rank calls ``generate`` with the same requests in the same order.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_flextron.compat.inference import apply_inference_shims, silence_engine_progress
from megatron_flextron.inference.subnetworks import Architecture, SubnetworkSelector


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling. ``top_k=1`` is greedy; ``seed`` fixes the sampling draws."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: Optional[int] = None

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
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def greedy(cls, max_new_tokens: int = 32) -> "Sampling":
        return cls(max_new_tokens=max_new_tokens, top_k=1)

    def params(self):
        from megatron.core.inference.sampling_params import SamplingParams

        return SamplingParams(
            temperature=float(self.temperature),
            top_k=self.top_k,
            top_p=float(self.top_p),
            num_tokens_to_generate=self.max_new_tokens,
        )


@dataclass
class Request:
    prompt_tokens: List[int]
    sampling: Sampling
    architecture: Architecture


@dataclass
class Result:
    text: str  # the continuation only
    tokens: List[int]  # generated ids (an EOD that stopped generation is left out)
    finish_reason: str  # "eod" or "length"
    architecture: Architecture
    step_seconds: List[float]  # per generated token: the first includes the prompt's prefill

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            **self.architecture.describe(),
        }


class EngineTokenizer:
    """The tokenizer interface megatron's controller reads (tokenize, detokenize, eod, bos)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eod, self.bos = tokenizer.eod, None
        self.vocab_size = tokenizer.vocab_size

    def tokenize(self, text: str) -> List[int]:
        return self._tok.tokenize(text)

    def detokenize(self, ids, **_kwargs) -> str:
        return self._tok.detokenize([int(i) for i in ids])


class ElasticGenerator:
    """megatron-core's static engine over one elastic model; sub-network chosen per request."""

    def __init__(
        self,
        model,
        tokenizer,
        selector: SubnetworkSelector,
        max_batch_size: int = 8,
        max_sequence_length: int = 1024,
    ):
        apply_inference_shims()
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import static_engine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
            GPTInferenceWrapper,
        )
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        m = selector.model_config
        limit = m.max_position_embeddings if m.position_embedding != "rope" else None
        if limit is not None and max_sequence_length > limit:
            raise ValueError(
                f"max sequence length {max_sequence_length} exceeds the model's "
                f"{limit} learned positions"
            )
        self.model, self.selector = model, selector
        self.tokenizer = EngineTokenizer(tokenizer)
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length
        config = InferenceWrapperConfig(
            hidden_size=m.hidden_size,
            params_dtype=next(model.parameters()).dtype,
            inference_batch_times_seqlen_threshold=-1,  # PP: one micro-batch per step
            padded_vocab_size=m.vocab_size,
            inference_max_requests=max_batch_size,
            inference_max_seq_length=max_sequence_length,
        )
        wrapped = GPTInferenceWrapper(model, config, StaticInferenceContext.from_config(config))
        self.controller = TextGenerationController(wrapped, self.tokenizer)
        silence_engine_progress()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the static engine will be deprecated"
            # legacy: the static batch path. The dynamic engine needs CUDA graphs and a paged
            # cache sized for thousands of requests, and is not what runs one batch per budget.
            self.engine = static_engine.StaticInferenceEngine(
                self.controller, max_batch_size=max_batch_size, legacy=True
            )

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

    def generate(self, requests: Sequence[Request]) -> List[Result]:
        """Results in request order; one engine run per (architecture, sampling) group."""
        groups: Dict[tuple, List[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.architecture.key, r.sampling), []).append(i)
        results: List[Optional[Result]] = [None] * len(requests)
        for (_, sampling), members in groups.items():
            arch = requests[members[0]].architecture
            with self.selector.active(self.model, arch):
                if sampling.seed is not None:
                    self.controller.sampling_rng.manual_seed(sampling.seed)
                group = self._run([requests[i] for i in members], sampling)
            for i, result in zip(members, group):
                results[i] = result
        return results

    def _run(self, requests: List[Request], sampling: Sampling) -> List[Result]:
        from megatron.core.inference.inference_request import InferenceRequest

        params = sampling.params()
        batch = [
            InferenceRequest(
                request_id=self.engine.get_new_request_id(),
                prompt=self.tokenizer.detokenize(r.prompt_tokens),
                prompt_tokens=list(r.prompt_tokens),
                sampling_params=params,
            )
            for r in requests
        ]
        done = self.engine.generate(inference_requests=batch)
        return [self._result(r, out) for r, out in zip(requests, done)]

    def _result(self, request: Request, out) -> Result:
        # megatron stops a request at EOD and leaves the EOD out of its generated tokens
        tokens = [int(t) for t in out.generated_tokens.tolist()]
        finish = "length" if len(tokens) == request.sampling.max_new_tokens else "eod"
        prompt_text = self.tokenizer.detokenize(request.prompt_tokens)
        full = self.tokenizer.detokenize(request.prompt_tokens + tokens)
        text = full[len(prompt_text) :] if full.startswith(prompt_text) else None
        if text is None:
            text = self.tokenizer.detokenize(tokens)
        return Result(text, tokens, finish, request.architecture, list(out.tpot or []))



def build_generator(
    ckpt_dir: str,
    router: str = "static",
    dtype: torch.dtype = torch.float32,
    max_batch_size: int = 8,
    max_sequence_length: int = 1024,
) -> ElasticGenerator:
    """Load a flextron checkpoint on this rank (model parallel already initialised) and wrap it
    with its own tokenizer."""
    import os

    from megatron_flextron.data.tokenizer import build_tokenizer
    from megatron_flextron.inference.subnetworks import load_served_model

    tokenizer_dir = os.path.join(ckpt_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"{ckpt_dir} has no tokenizer/ folder: cannot generate text")
    # megatron logs a deprecation notice per legacy tokenizer; the interface is what it reads
    logging.getLogger("megatron.core.datasets.megatron_tokenizer").setLevel(logging.ERROR)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    model, selector = load_served_model(ckpt_dir, dtype, router)
    return ElasticGenerator(model, tokenizer, selector, max_batch_size, max_sequence_length)
