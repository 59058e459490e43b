"""Perplexity of a flextron checkpoint, of one of its sub-networks, or of what each budget runs.

A budget runs what the checkpoint's budget policy chooses (routers/policy.py): its trained static
router, the elastic choices nearest to the budget (training's rule) without one, or with
``router="token"`` its token routers (every token's MLP width). The loss is the mean next-token
NLL over every predicted position of every sequence; each sequence is evaluated on its own.
Optional extras: zero-shot multiple-choice accuracy, the forward time of one micro-batch, and
for token routing the static sub-networks at the same mean MLP width.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_flextron.checkpoint.load import (
    ElasticModel,
    check_seq_length,
    load_elastic_model,
    read_model_configs,
)
from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.data.corpus import (
    check_token_ids,
    load_tokenizer,
    read_token_lists,
    token_sequences,
)
from megatron_flextron.elastic.state import elastic_state
from megatron_flextron.elastic.subnetwork import Subnetwork, count_parameters
from megatron_flextron.evaluation.multiple_choice import read_tasks, score
from megatron_flextron.lm_step import forward_backward, pad_microbatches
from megatron_flextron.routers.checkpoint import check_router_request, load_budget_policy
from megatron_flextron.routers.latency import time_ms
from megatron_flextron.routers.sampling import check_budgets


@dataclass
class PerplexityOptions:
    """What to evaluate (tools/evaluate.py's flags)."""

    load: str  # flextron checkpoint directory
    data: Optional[str] = None  # wiki:SPLIT or a text file (documents split by blank lines)
    tokens_jsonl: Optional[str] = None  # or: one JSON list of token ids per line
    subnetwork: Optional[str] = None  # a sub-network spec (JSON or file); default: full model
    budgets: Sequence[float] = ()  # evaluate what each budget runs instead
    require_router: bool = False  # budgets only through a trained static router
    router: Optional[str] = None  # None (the stored router, else nearest) | none | joint | token
    mc_tasks: Sequence[str] = ()  # multiple-choice task files (tools/make_mc_tasks.py)
    measure_latency: bool = False
    compare_static: bool = False  # token routing: the static line at the same mean width
    bf16: bool = False
    label: Optional[str] = None  # the method name stored in every result
    seq_length: int = 512
    max_sequences: Optional[int] = None
    micro_batch_size: int = 4
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    def validate(self) -> None:
        if (self.data is None) == (self.tokens_jsonl is None):
            raise ValueError("give exactly one of a text source and a token-id .jsonl")
        if self.subnetwork is not None and self.budgets:
            raise ValueError("a sub-network spec and budgets are mutually exclusive")
        self.router = check_router_request(self.router, self.budgets, self.compare_static)
        check_budgets(list(self.budgets) or [1.0])


@dataclass
class PerplexityResult:
    """One evaluated sub-network (or budget). ``params`` is None when tokens are routed (see
    ``mean_mlp_width_fraction``); ``choice``: how the budget's architecture was chosen."""

    loss: float
    ppl: float
    tokens: int
    sequences: int
    subnetwork: dict
    params: Optional[int]
    seconds: float  # wall time of the evaluation pass
    latency_ms: Optional[float] = None  # median forward time of one micro-batch
    mc: Optional[Dict[str, dict]] = None  # task -> {acc, acc_norm, examples}
    budget: Optional[float] = None
    choice: Dict[str, object] = field(default_factory=dict)  # {"chosen_by", cost ratios, ...}
    method: Optional[str] = None
    mean_mlp_width_fraction: Optional[float] = None
    static_at_mean_width: Optional[dict] = None

    def to_dict(self) -> dict:
        """The JSON row of tools/evaluate.py and tools/make_report.py (absent fields left out)."""
        out = {} if self.method is None else {"method": self.method}
        if self.budget is not None:
            out["budget"] = self.budget
        out.update(
            loss=self.loss,
            ppl=self.ppl,
            tokens=self.tokens,
            sequences=self.sequences,
            subnetwork=self.subnetwork,
            params=self.params,
            seconds=self.seconds,
        )
        for key in ("latency_ms", "mc"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.choice)
        for key in ("mean_mlp_width_fraction", "static_at_mean_width"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def load_sequences(opts: PerplexityOptions, tokenizer_dir: Optional[str]) -> List[List[int]]:
    if opts.tokens_jsonl:
        seqs = read_token_lists(opts.tokens_jsonl, opts.seq_length)
    else:
        seqs = token_sequences(opts.data, tokenizer_dir, opts.seq_length)
    seqs = seqs[: opts.max_sequences]
    if not seqs:
        raise ValueError("no sequence to evaluate")
    return seqs


class _Evaluator:
    """One loaded model and its batches; measures the model as currently set."""

    def __init__(self, opts: PerplexityOptions, loaded: ElasticModel, seqs: List[List[int]]):
        self.opts, self.loaded, self.seqs = opts, loaded, seqs
        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.batches = pad_microbatches(seqs, opts.micro_batch_size, self.device)
        self.tasks = {}
        if opts.mc_tasks:
            self.mc_tokenizer = load_tokenizer(loaded.tokenizer_dir or "")
            for path in opts.mc_tasks:
                self.tasks[os.path.splitext(os.path.basename(path))[0]] = read_tasks(path)
            if len(self.tasks) < len(opts.mc_tasks):
                names = list(opts.mc_tasks)
                raise ValueError(f"--mc-tasks {names}: task files need distinct names")
        with torch.no_grad():  # warm-up, so that the first sub-network's time is not inflated
            forward_backward(self.model, self.batches[:1], True)

    def measure(
        self, subnet: Subnetwork, during: Callable[[], dict] = dict, tasks: bool = True
    ) -> PerplexityResult:
        """Loss (and latency, and with ``tasks`` the multiple-choice scores) of the model as set;
        ``during``: what the budget policy measured in the perplexity pass (not in the timing
        passes), e.g. a routed mean width."""
        start = time.perf_counter()
        with torch.no_grad():
            out = forward_backward(self.model, self.batches, True)
        seconds = time.perf_counter() - start
        used = during()
        loss = out["nll_sum"] / out["tokens"]
        result = PerplexityResult(
            loss=round(loss, 6),
            ppl=round(math.exp(loss), 4),
            tokens=int(out["tokens"]),
            sequences=len(self.seqs),
            subnetwork=subnet.to_dict(),
            params=count_parameters(subnet, self.loaded.model_cfg)["total"],
            seconds=round(seconds, 3),
        )
        if "mean_mlp_width_fraction" in used:  # routed per token: see the mean width
            result.mean_mlp_width_fraction = round(used["mean_mlp_width_fraction"], 4)
            result.params = None
        if self.opts.measure_latency:
            with torch.inference_mode():
                result.latency_ms = round(
                    time_ms(lambda: forward_backward(self.model, self.batches[:1], True), 10), 3
                )
        if self.tasks and tasks:
            result.mc = {}
            for name, examples in self.tasks.items():
                mc = score(self.model, self.mc_tokenizer, examples, device=self.device)
                result.mc[name] = {
                    "acc": round(mc["acc"], 4),
                    "acc_norm": round(mc["acc_norm"], 4),
                    "examples": mc["examples"],
                }
        return result

    def measure_spec(self, spec, tasks: bool = True) -> PerplexityResult:
        m = self.loaded
        with elastic_state(self.model, m.model_cfg, m.elastic, subnetwork=spec) as subnet:
            return self.measure(subnet or Subnetwork.full(m.model_cfg), tasks=tasks)


def evaluate_perplexity(opts: PerplexityOptions) -> List[PerplexityResult]:
    """One result per evaluated sub-network (the ``subnetwork`` one, or one per budget).
    Call after ``initialize_model_parallel`` (any TP/PP)."""
    opts.validate()
    tp, pp = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    model_cfg = read_model_configs(opts.load)[1]  # a missing or foreign checkpoint is named
    tokenizer = os.path.join(opts.load, "tokenizer")  # before any text is read
    seqs = load_sequences(opts, tokenizer if os.path.isdir(tokenizer) else None)
    check_seq_length(model_cfg, opts.seq_length, used=max(len(s) for s in seqs) - 1)
    loaded = load_elastic_model(opts.load, tp, pp, dtype)
    model, model_cfg, elastic = loaded.model, loaded.model_cfg, loaded.elastic
    check_token_ids(seqs, model_cfg.vocab_size, opts.tokens_jsonl or "the tokenizer's ids")
    policy = load_budget_policy(
        opts.load, model_cfg, elastic, opts.router, opts.require_router, gpt=model
    )
    evaluator = _Evaluator(opts, loaded, seqs)
    results, static_cache = [], {}
    for budget in list(opts.budgets) or [None]:
        if budget is None:
            result = evaluator.measure_spec(opts.subnetwork)
        else:
            with policy.active(model, budget) as choice:
                subnet = choice.subnetwork or Subnetwork.full(model_cfg)
                result = evaluator.measure(subnet, during=policy.measured)
            result.budget, result.choice = budget, dict(choice.info)
            if opts.compare_static and choice.per_token:
                result.static_at_mean_width = static_at_width(
                    result.mean_mlp_width_fraction,
                    model_cfg,
                    elastic,
                    lambda spec: evaluator.measure_spec(spec, tasks=False).to_dict(),
                    static_cache,
                )
        result.method = opts.label
        results.append(result)
    return results


def static_at_width(
    fraction: float, model_cfg: ModelConfig, elastic: ElasticConfig, measure, cache: dict
) -> dict:
    """The static line at a routed mean MLP width: the homogeneous sub-networks (every head) at
    the two MLP choices around it, measured, and their loss (and latency) interpolated linearly
    in width: what a static model of the same average MLP FLOPs would give."""
    choices = sorted(elastic.choices_with_full(model_cfg)[0])
    width = fraction * model_cfg.ffn_hidden_size
    below = [c for c in choices if c <= width] or choices[:1]
    above = [c for c in choices if c >= width] or choices[-1:]
    lo, hi = below[-1], above[0]
    for c in (lo, hi):
        if c not in cache:
            cache[c] = measure({"mlp": c, "heads": model_cfg.num_attention_heads})
    t = 0.0 if hi == lo else min(max((width - lo) / (hi - lo), 0.0), 1.0)
    out = {"mlp_widths": [lo, hi]}
    keys = ["loss"] + (["latency_ms"] if "latency_ms" in cache[lo] else [])
    for key in keys:
        out[key] = round((1 - t) * cache[lo][key] + t * cache[hi][key], 6)
        out[f"{key}_at_widths"] = [cache[lo][key], cache[hi][key]]
    out["ppl"] = round(math.exp(out["loss"]), 4)
    return out


def markdown_table(results: Sequence[dict]) -> str:
    """The per-budget table tools/evaluate.py prints after the JSON lines."""
    static = any("static_at_mean_width" in r for r in results)
    rows = [
        "| budget | sub-network | chosen by | params (M) | loss | perplexity | eval time (s) |"
        + (" static loss at the same mean width |" if static else ""),
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if static else ""),
    ]
    for r in results:
        rows.append(
            f"| {r['budget']:g} | {_architecture(r)} | {r['chosen_by']} | "
            f"{'per token' if r['params'] is None else format(r['params'] / 1e6, '.1f')} | "
            f"{r['loss']:.3f} | {r['ppl']:.2f} | {r['seconds']:.2f} |"
        )
        if static:
            same = r.get("static_at_mean_width")
            rows[-1] += f" {same['loss']:.3f} |" if same else " - |"
    return "\n".join(rows)


def _architecture(result: dict) -> str:
    if "mean_mlp_width_fraction" in result:
        return f"per token: mean MLP width {result['mean_mlp_width_fraction']:.3f}"
    return f"`{json.dumps(result['subnetwork'])}`"

