"""Command-line flags of elastic training: Megatron's names, mapped onto composed dataclasses.

Every inconsistent combination is refused here, before any process group or model exists.
"""

from __future__ import annotations

import argparse
import math
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_flextron.cli import ArgumentParser, check_output
from megatron_flextron.data.gpt_data import check_data_path, check_split
from megatron_flextron.routers.checkpoint import ROUTER_KINDS
from megatron_flextron.routers.sampling import check_budgets

TRACKER = "latest_checkpointed_iteration.txt"


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # balanced: a sub-network's ranked prefix of experts spreads over the EP ranks; the same
    # function and checkpoints as contiguous (megatron's), and the identity at EP=1
    expert_placement: str = "balanced"
    sequence_parallel: bool = False


@dataclass
class DataArgs:
    data_path: List[str] = field(default_factory=list)
    split: str = "969,30,1"
    seq_length: int = 256
    micro_batch_size: int = 4
    global_batch_size: int = 8
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None


@dataclass
class OptimizerArgs:
    lr: float = 9e-5
    min_lr: float = 9e-6
    lr_warmup_iters: int = 10
    lr_decay_iters: Optional[int] = None  # None: --train-iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


@dataclass
class RunArgs:
    train_iters: int = 100
    seed: int = 1234
    bf16: bool = False
    fp16: bool = False
    load: Optional[str] = None
    no_load_optim: bool = False
    finetune: bool = False
    save: Optional[str] = None
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    # on by default: a preemption (SIGTERM) then costs one iteration, not the work since the
    # last --save-interval; the price is one scalar all-reduce per iteration
    exit_signal_handler: bool = True
    eval_interval: int = 50
    eval_iters: int = 4
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None


@dataclass
class ElasticArgs:
    budget_list: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.35])
    budget_probs: Optional[List[float]] = None
    mlp_choices: Optional[List[float]] = None  # ratios; None: the checkpoint's choices
    head_choices: Optional[List[float]] = None
    original_model_sample_prob: float = 1 / 3
    heterogeneous: bool = False
    distill: str = "inplace"
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    router: str = "none"
    router_lr: float = 1e-3
    router_cost_metric: str = "params"
    latency_table: Optional[str] = None
    router_budget_weight: float = 30.0
    budget_tolerance: float = 0.02
    router_layer_skipping: bool = False
    budget_type: Optional[str] = None  # None: the checkpoint's (active by default)
    moe_aux_loss_coeff: float = 0.0
    moe_router_load_balancing_type: str = "none"


@dataclass
class TrainingArgs:
    parallel: ParallelArgs
    data: DataArgs
    optimizer: OptimizerArgs
    run: RunArgs
    elastic: ElasticArgs

    @property
    def data_parallel_size(self) -> int:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return world // (
            self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        )

    @property
    def num_microbatches(self) -> int:
        return self.data.global_batch_size // (self.data.micro_batch_size * self.data_parallel_size)


# flag -> (group, help); argparse types and defaults come from the dataclass fields
_GROUPS = {
    "parallel": ParallelArgs,
    "data": DataArgs,
    "optimizer": OptimizerArgs,
    "run": RunArgs,
    "elastic": ElasticArgs,
}
_HELP = {
    "tensor_model_parallel_size": "tensor-parallel size (divides heads, KV groups, widths, vocab)",
    "pipeline_model_parallel_size": "pipeline-parallel size (divides the layers)",
    "expert_model_parallel_size": "expert-parallel size (divides the experts of an MoE)",
    "expert_placement": "how the ranked experts sit over the EP ranks: balanced (round-robin: "
    "every sub-network's kept experts spread over all ranks) or contiguous (megatron's: a "
    "sub-network's experts on the first ranks); checkpoints are the same either way",
    "sequence_parallel": "split the sequence over TP ranks outside attention and MLP "
    "(megatron's MoE needs it to train under TP)",
    "data_path": "megatron blend: PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... (.bin/.idx)",
    "split": "train,valid,test proportions of the blend, e.g. 969,30,1",
    "seq_length": "tokens per sample",
    "micro_batch_size": "samples per micro-batch per data-parallel rank",
    "global_batch_size": "samples per iteration over all ranks (a multiple of micro x DP)",
    "tokenizer_type": "HuggingFaceTokenizer (tokenizer.json), SentencePieceTokenizer or "
    "GPT2BPETokenizer (default: the --load checkpoint's tokenizer)",
    "tokenizer_model": "tokenizer.json, its folder, a sentencepiece .model, or a folder with "
    "vocab.json + merges.txt",
    "vocab_file": "GPT2BPETokenizer: vocab.json",
    "merge_file": "GPT2BPETokenizer: merges.txt",
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the decay",
    "lr_warmup_iters": "linear warmup iterations",
    "lr_decay_iters": "iterations of the decay (default: --train-iters)",
    "lr_decay_style": "constant, linear or cosine",
    "weight_decay": "decoupled weight decay (applied to the active sub-network only)",
    "clip_grad": "global gradient-norm clip (0: off)",
    "use_distributed_optimizer": "shard optimizer state over data-parallel ranks",
    "train_iters": "iterations to train",
    "seed": "random seed",
    "bf16": "bfloat16 parameters and compute",
    "fp16": "float16 parameters and compute",
    "load": "checkpoint to start or resume from (a checkpoint in --save takes precedence)",
    "no_load_optim": "load weights and progress only (e.g. to resume at another TP size)",
    "finetune": "load weights only and start at iteration 0",
    "save": "checkpoint directory to write",
    "save_interval": "iterations between checkpoints",
    "exit_interval": "save (with --save) and exit when the iteration is a multiple of this",
    "exit_signal_handler": "on SIGTERM (a preemption), every rank finishes the iteration, saves "
    "(with --save) and exits with status 0 (default on; --no-exit-signal-handler: die at once)",
    "eval_interval": "iterations between evals",
    "eval_iters": "validation micro-batches per eval and budget",
    "log_interval": "iterations between log lines",
    "tensorboard_dir": "tensorboard event folder",
    "metrics_file": "JSON lines of every logged and evaluated metric (rank 0)",
    "budget_list": "trained budgets, descending, in (0, 1]",
    "budget_probs": "sampling probability of each budget (default uniform)",
    "mlp_choices": "MLP width ratios of the elastic axes",
    "head_choices": "head-count ratios of the elastic axes",
    "original_model_sample_prob": "probability that a micro-batch trains the full model",
    "heterogeneous": "sample per-layer widths under each budget",
    "distill": "none, inplace (full model's logits) or frozen (the original model's)",
    "kd_temperature": "distillation temperature",
    "kd_weight": "weight of the distillation loss added to the LM loss",
    "router": "joint: train the static budget router with the model (budget micro-batches run "
    "its sampled per-layer architecture); token: train per-layer token routers with the model "
    "(budget micro-batches route each token's MLP width; a budget is the mean MLP width "
    "fraction); none: nearest homogeneous choices",
    "router_lr": "Adam learning rate of the joint router or token routers",
    "router_cost_metric": "what a budget measures: params, flops, kv_cache or latency",
    "latency_table": "JSON from tools/measure_latency.py (--router-cost-metric latency)",
    "router_budget_weight": "weight of the router's budget loss (token routers: of the aux loss)",
    "budget_tolerance": "relative cost error inside which the budget loss is zero",
    "router_layer_skipping": "--router joint: the router also chooses which layers to skip",
    "budget_type": "mixtures of experts: a budget is a fraction of the active parameters (per "
    "token: compute) or of the total (memory); default: the checkpoint's, else active",
    "moe_aux_loss_coeff": "megatron's MoE load-balancing loss coefficient (logged per budget)",
    "moe_router_load_balancing_type": "megatron's MoE load balancing: none, aux_loss, seq_aux_loss "
    "or global_aux_loss",
}
_CHOICES = {
    "expert_placement": ["balanced", "contiguous"],
    "lr_decay_style": ["constant", "linear", "cosine"],
    "distill": ["none", "inplace", "frozen"],
    "router": list(ROUTER_KINDS),
    "router_cost_metric": ["params", "flops", "kv_cache", "latency"],
    "budget_type": ["active", "total"],
    "moe_router_load_balancing_type": ["none", "aux_loss", "seq_aux_loss", "global_aux_loss"],
    "tokenizer_type": ["HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer"],
}
# numeric ranges, checked before any process group starts: (lowest, lowest allowed?, highest)
_RANGES = {
    "tensor_model_parallel_size": (1, True, None),
    "pipeline_model_parallel_size": (1, True, None),
    "expert_model_parallel_size": (1, True, None),
    "moe_aux_loss_coeff": (0, True, None),
    "seq_length": (1, True, None),
    "micro_batch_size": (1, True, None),
    "global_batch_size": (1, True, None),
    "lr": (0, True, None),
    "min_lr": (0, True, None),
    "lr_warmup_iters": (0, True, None),
    "lr_decay_iters": (1, True, None),
    "weight_decay": (0, True, None),
    "clip_grad": (0, True, None),
    "train_iters": (1, True, None),
    "seed": (0, True, None),
    "save_interval": (1, True, None),
    "exit_interval": (1, True, None),
    "eval_interval": (0, True, None),  # 0: no evaluation
    "eval_iters": (1, True, None),
    "log_interval": (1, True, None),
    "budget_probs": (0, True, 1),
    "original_model_sample_prob": (0, True, 1),
    "kd_temperature": (0, False, None),
    "kd_weight": (0, True, None),
    "router_lr": (0, False, None),
    "router_budget_weight": (0, True, None),
    "budget_tolerance": (0, True, 1),
}


def positive_int(text: str) -> int:
    """argparse type of the tools' sizes and counts: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(hint):
    """(element type, is a list) of a field's type hint: int, Optional[float], List[str], ..."""
    origin, inner = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        (hint,) = [t for t in inner if t is not type(None)]
        origin, inner = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, List):
        return inner[0], True
    return hint, False


def build_parser() -> ArgumentParser:
    """Every dataclass field is a flag; its argparse type comes from the field's type hint."""
    parser = ArgumentParser(description="Elastic (Flextron) continued pretraining")
    for group_name, cls in _GROUPS.items():
        group = parser.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for name, f in cls.__dataclass_fields__.items():
            default = f.default_factory() if callable(f.default_factory) else f.default
            kind, is_list = _unwrap(hints[name])
            if kind is bool:  # a flag that defaults on also gets its --no- form
                action = argparse.BooleanOptionalAction if default else "store_true"
                group.add_argument(_flag(name), action=action, default=default, help=_HELP[name])
                continue
            group.add_argument(
                _flag(name),
                type=kind,
                nargs="+" if is_list else None,
                default=default,
                choices=_CHOICES.get(name),
                help=_HELP[name],
            )
    return parser


def parse_args(argv=None) -> TrainingArgs:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    args = TrainingArgs(
        **{g: cls(**{k: ns[k] for k in cls.__dataclass_fields__}) for g, cls in _GROUPS.items()}
    )
    try:
        validate(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def validate(args: TrainingArgs) -> None:
    """Refuse inconsistent settings with a message naming them."""
    p, d, o, r, e = args.parallel, args.data, args.optimizer, args.run, args.elastic
    check_ranges(args)
    check_split(d.split)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by TP x PP = {model_parallel}")
    dp = world // model_parallel
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size {d.global_batch_size} is not divisible by --micro-batch-size "
            f"{d.micro_batch_size} x data-parallel size {dp}"
        )
    if r.bf16 and r.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive")
    if not d.data_path:
        raise ValueError("--data-path is required")
    try:
        check_data_path(d.data_path)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    decay_iters = o.lr_decay_iters or r.train_iters
    if o.lr_warmup_iters >= decay_iters:
        raise ValueError(
            f"--lr-warmup-iters {o.lr_warmup_iters} must be below the decay iterations "
            f"{decay_iters} (--lr-decay-iters or --train-iters)"
        )
    if o.min_lr > o.lr:
        raise ValueError(f"--min-lr {o.min_lr} is above --lr {o.lr}")
    check_budgets(e.budget_list, e.budget_probs)
    for name in ("mlp_choices", "head_choices"):
        for ratio in getattr(e, name) or []:
            if not 0 < ratio <= 1:
                raise ValueError(f"--{name.replace('_', '-')} ratio {ratio} must lie in (0, 1]")
    if r.load is None and not (r.save and os.path.isfile(os.path.join(r.save, TRACKER))):
        raise ValueError("--load is required (a converted flextron checkpoint to train)")
    if r.load is not None and not os.path.isfile(os.path.join(r.load, "flextron_config.json")):
        raise ValueError(f"--load {r.load} is not a flextron checkpoint (no flextron_config.json)")
    if e.distill == "frozen" and r.load is None:
        raise ValueError("--distill frozen needs --load (the original model is the teacher)")
    if e.router == "token" and r.fp16:
        raise ValueError(
            "--router token with --fp16: the token routers' aux loss and Adam step do not follow "
            "fp16 loss scaling; use --bf16"
        )
    if e.router_layer_skipping and e.router != "joint":
        raise ValueError("--router-layer-skipping needs --router joint")
    if e.router_cost_metric == "latency" and not e.latency_table:
        raise ValueError("--router-cost-metric latency needs --latency-table")
    if r.save_interval is not None and r.save is None:
        raise ValueError("--save-interval needs --save")
    if r.save is not None:
        check_output(r.save, "--save", folder=True)
    if o.weight_decay and o.use_distributed_optimizer and (r.bf16 or r.fp16):
        raise ValueError(
            f"--weight-decay {o.weight_decay} with --{'bf16' if r.bf16 else 'fp16'} and "
            "--use-distributed-optimizer is not supported (the elastic weight decay needs fp32 "
            "master weights that are views of the parameters); use --weight-decay 0 or drop "
            "--use-distributed-optimizer"
        )


def check_ranges(args: TrainingArgs) -> None:
    """Every numeric flag finite and inside its range (a zero size divides by zero later, a zero
    --kd-temperature trains to NaN)."""
    for group in (args.parallel, args.data, args.optimizer, args.run, args.elastic):
        for name in group.__dataclass_fields__:
            value = getattr(group, name)
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if not math.isfinite(v):
                    raise ValueError(f"{_flag(name)} {v} is not a finite number")
                if name not in _RANGES:
                    continue
                low, inclusive, high = _RANGES[name]
                if v < low or (v == low and not inclusive) or (high is not None and v > high):
                    bound = f">= {low}" if inclusive else f"> {low}"
                    bound += f" and <= {high}" if high is not None else ""
                    raise ValueError(f"{_flag(name)} {v} must be {bound}")
