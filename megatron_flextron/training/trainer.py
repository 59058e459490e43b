"""Elastic continued pretraining on megatron-core (the body of tools/pretrain_flextron.py).

megatron's process groups, GPTModel (elastic layer spec), DistributedDataParallel, optimizer and
OptimizerParamScheduler, pipeline schedules and GPTDataset; the Flextron parts are the per
micro-batch sub-network sampling with distillation (ElasticStep) and the weight decay restricted
to the trained slices (ElasticWeightDecay). Runs under torchrun (one node or many) or as a single
process; resumes from the newest checkpoint in ``--save`` when there is one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
from megatron_flextron.checkpoint.load import check_seq_length
from megatron_flextron.config import DEFAULT_RATIOS, ElasticConfig, ModelConfig, Runtime
from megatron_flextron.data.gpt_data import build_gpt_datasets, rank_microbatches
from megatron_flextron.data.tokenizer import build_tokenizer
from megatron_flextron.elastic import build_elastic_model
from megatron_flextron.elastic.weight_decay import ElasticWeightDecay
from megatron_flextron.lm_step import forward_backward
from megatron_flextron.parallel import (
    current_device,
    data_parallel_mean,
    initialize_model_parallel,
)
from megatron_flextron.routers.build import RouterSettings, training_policy
from megatron_flextron.routers.sampling import BudgetSampler
from megatron_flextron.training.arguments import TrainingArgs
from megatron_flextron.training.checkpointing import (
    check_resume_source,
    has_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from megatron_flextron.training.elastic_step import ElasticStep
from megatron_flextron.training.guards import check_parameters, check_step
from megatron_flextron.training.signals import ExitSignalHandler


@dataclass
class Run:
    """Everything a training run holds between iterations."""

    args: TrainingArgs
    source: str  # the checkpoint the run started or resumed from
    config: dict  # its flextron_config.json
    model_cfg: ModelConfig
    elastic_cfg: ElasticConfig
    model: torch.nn.Module  # DDP(GPTModel) of this rank's pipeline stage
    optimizer: object
    scheduler: OptimizerParamScheduler
    step: ElasticStep
    train_data: object
    valid_data: Optional[object]
    iteration: int = 0
    consumed_train_samples: int = 0


def _params_dtype(args: TrainingArgs) -> torch.dtype:
    if args.run.bf16:
        return torch.bfloat16
    return torch.float16 if args.run.fp16 else torch.float32


def _elastic_config(args: TrainingArgs, model_cfg: ModelConfig, stored: Optional[dict]):
    """The checkpoint's choices unless --mlp-choices/--head-choices give ratios."""
    e, tp = args.elastic, args.parallel.tensor_model_parallel_size
    if stored and e.mlp_choices is None and e.head_choices is None:
        elastic = ElasticConfig.from_dict(stored)
    else:
        elastic = ElasticConfig.from_ratios(
            model_cfg, e.mlp_choices or DEFAULT_RATIOS, e.head_choices or DEFAULT_RATIOS, tp
        )
    for width in elastic.mlp_choices:
        if width % tp:
            raise ValueError(f"MLP choice {width} is not divisible by TP size {tp}")
    if e.budget_type is not None:
        elastic = dataclasses.replace(elastic, budget_type=e.budget_type)
    return elastic


def _build_model(args: TrainingArgs, model_cfg: ModelConfig):
    p = args.parallel
    runtime = Runtime(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        _params_dtype(args),
        sequence_parallel=p.sequence_parallel,
        device=current_device(),
        expert_model_parallel_size=p.expert_model_parallel_size,
    )
    e = args.elastic
    moe = {}
    if model_cfg.is_moe:
        moe = dict(
            moe_aux_loss_coeff=e.moe_aux_loss_coeff,
            moe_router_load_balancing_type=e.moe_router_load_balancing_type,
        )
    tconfig = runtime.transformer_config(model_cfg, **moe)
    model = build_elastic_model(model_cfg, tconfig, expert_placement=p.expert_placement)
    model = model.to(runtime.device)
    if args.run.bf16 or args.run.fp16:
        model = Float16Module(tconfig, model)
    return model, tconfig


def _frozen_teacher(args: TrainingArgs, model_cfg: ModelConfig):
    teacher, _ = _build_model(args, model_cfg)
    load_flextron_into_model(teacher, args.run.load)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _policy(args: TrainingArgs, model, model_cfg, elastic_cfg, resume: dict):
    """The run's budget policy (--router none | joint | token), resumed from the checkpoint."""
    e = args.elastic
    if model_cfg.is_moe and e.router == "token":
        raise ValueError(
            "--router token is not built for mixtures of experts: a token router picks each "
            "token's dense MLP width, and an MoE layer already routes every token (its top-k "
            "experts); use --router joint (per-layer experts, expert width and top-k for each "
            "budget) or --router none"
        )
    settings = RouterSettings(
        kind=e.router,
        budgets=e.budget_list,
        lr=e.router_lr,
        budget_weight=e.router_budget_weight,
        tolerance=e.budget_tolerance,
        cost_metric=e.router_cost_metric,
        latency_table=e.latency_table,
        layer_skipping=e.router_layer_skipping,
        seq_length=args.data.seq_length,
        train_iters=args.run.train_iters,
        seed=args.run.seed,
    )
    return training_policy(settings, model, model_cfg, elastic_cfg, resume, args.run.load)


def setup(args: TrainingArgs) -> Run:
    p, o, r, e, d = args.parallel, args.optimizer, args.run, args.elastic, args.data
    initialize_model_parallel(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        r.seed,
        expert_model_parallel_size=p.expert_model_parallel_size,
    )
    resuming = has_checkpoint(r.save)
    if resuming:
        check_resume_source(r.save, r.load)
    source = r.save if resuming else r.load
    config = read_config(source)
    model_cfg = ModelConfig.from_dict(config["model"])
    check_seq_length(model_cfg, d.seq_length)
    elastic_cfg = _elastic_config(args, model_cfg, config.get("elastic"))

    gpt, tconfig = _build_model(args, model_cfg)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    model = DistributedDataParallel(tconfig, ddp_config, gpt)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=0.0,  # decoupled decay of the trained slices: ElasticWeightDecay
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=o.clip_grad,
            bf16=r.bf16,
            fp16=r.fp16,
            params_dtype=_params_dtype(args),
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        [model],
    )
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.lr_decay_iters or r.train_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=r.train_iters,
        wd_incr_style="constant",
    )
    load_optim = not (r.no_load_optim or (r.finetune and not resuming))
    iteration, consumed, common = load_training_checkpoint(
        source, model, optimizer, scheduler, load_optim
    )
    if r.finetune and not resuming:
        iteration, consumed = 0, 0

    tokenizer_model = d.tokenizer_model or os.path.join(source, "tokenizer")
    tokenizer = build_tokenizer(d.tokenizer_type, tokenizer_model, d.vocab_file, d.merge_file)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_model} has {tokenizer.vocab_size} tokens, the model "
            f"{model_cfg.vocab_size}"
        )
    dp = parallel_state.get_data_parallel_world_size()
    train_data, valid_data, _ = build_gpt_datasets(
        d.data_path,
        d.split,
        d.seq_length,
        r.seed,
        tokenizer,
        [r.train_iters * d.global_batch_size, r.eval_iters * d.micro_batch_size * dp, None],
    )
    if train_data is None:
        raise ValueError(f"--split {d.split} leaves no training data")

    sampler = BudgetSampler(
        model_cfg,
        elastic_cfg,
        budgets=e.budget_list,
        probs=e.budget_probs,
        full_model_prob=e.original_model_sample_prob,
        heterogeneous=e.heterogeneous,
        seed=r.seed,
    )
    weight_decay = ElasticWeightDecay(model, o.weight_decay, optimizer) if o.weight_decay else None
    step = ElasticStep(
        model,
        model_cfg,
        elastic_cfg,
        sampler,
        distill=e.distill,
        kd_temperature=e.kd_temperature,
        kd_weight=e.kd_weight,
        teacher=_frozen_teacher(args, model_cfg) if e.distill == "frozen" else None,
        weight_decay=weight_decay,
        policy=_policy(args, model, model_cfg, elastic_cfg, common if resuming else {}),
    )
    return Run(
        args,
        source,
        config,
        model_cfg,
        elastic_cfg,
        model,
        optimizer,
        scheduler,
        step,
        train_data,
        valid_data,
        iteration,
        consumed,
    )


def _microbatches(run: Run, dataset, first_sample: int, count: int) -> List[dict]:
    return rank_microbatches(
        dataset,
        first_sample,
        count,
        run.args.data.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        current_device(),
    )


def train_step(run: Run) -> dict:
    """One iteration: forward/backward of every micro-batch, elastic decay, optimizer step."""
    args = run.args
    microbatches = _microbatches(
        run, run.train_data, run.consumed_train_samples, args.num_microbatches
    )
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()
    stats = run.step.run(run.iteration, microbatches)
    lr = run.optimizer.param_groups[0]["lr"]
    if run.step.weight_decay is not None:
        run.step.weight_decay.apply(lr)
    run.step.policy.finish_grads()
    updated, grad_norm, _ = run.optimizer.step()
    check_step(stats, grad_norm, run.iteration + 1, skipped=not updated)
    run.step.policy.step()
    run.scheduler.step(increment=1)
    run.iteration += 1
    run.consumed_train_samples += args.data.global_batch_size
    stats.update(iteration=run.iteration, lr=lr, grad_norm=grad_norm)
    return stats


def evaluate_budgets(run: Run) -> dict:
    """Validation loss of the full model and of what each budget runs (same batches)."""
    args = run.args
    if run.valid_data is None:
        return {}
    microbatches = _microbatches(run, run.valid_data, 0, args.run.eval_iters)
    losses = {}
    for budget in run.step.budget_keys:
        with run.step.policy.active(run.model, budget), torch.no_grad():
            out = forward_backward(run.model, microbatches, forward_only=True)
        losses[f"{budget:g}"] = data_parallel_mean(out["loss"])
    return losses


def save(run: Run) -> None:
    check_parameters(run.model, run.iteration)  # collective: never a non-finite checkpoint
    metadata = dict(run.config.get("metadata") or {})
    metadata["training"] = {
        "iteration": run.iteration,
        "consumed_train_samples": run.consumed_train_samples,
        "tokens": run.consumed_train_samples * run.args.data.seq_length,
    }
    tokenizer = os.path.join(run.source, "tokenizer")
    policy = run.step.policy
    state = policy.state_dict()  # collective: gathers e.g. the token routers of every stage
    save_training_checkpoint(
        run.args.run.save,
        run.iteration,
        run.model,
        run.optimizer,
        run.scheduler,
        run.consumed_train_samples,
        run.model_cfg,
        run.elastic_cfg,
        metadata,
        tokenizer if os.path.isdir(tokenizer) else None,
        extra=None if state is None else {policy.checkpoint_key: state},
    )
    if torch.distributed.get_rank() == 0:  # the stored form --budget / --router token read
        policy.export(run.args.run.save, state)
    torch.distributed.barrier()


def pretrain(args: TrainingArgs, logger=None) -> List[dict]:
    """Train to --train-iters; returns every iteration's stats (and evals) on every rank."""
    from megatron_flextron.training.log import TrainingLogger

    run = setup(args)
    log = logger or TrainingLogger(args)
    log.start(run)
    history = []
    r = args.run
    saved = run.iteration
    # without --save there is nothing to save: SIGTERM keeps its default (die at once)
    with ExitSignalHandler(r.exit_signal_handler and bool(r.save)) as signals:
        while run.iteration < r.train_iters:
            start = time.time()
            stats = train_step(run)
            stats["time"] = time.time() - start
            if r.eval_interval and run.iteration % r.eval_interval == 0:
                stats["eval"] = evaluate_budgets(run)
                stats.update(run.step.policy.eval_stats())
            log.iteration(stats)
            history.append(stats)
            preempted = signals.received(current_device())  # collective: all ranks agree
            if preempted:
                log.message(f"{signals.name} received: saving at iteration {run.iteration}")
            exiting = preempted or (bool(r.exit_interval) and run.iteration % r.exit_interval == 0)
            if r.save and (exiting or (r.save_interval and run.iteration % r.save_interval == 0)):
                save(run)
                saved = run.iteration
                log.message(f"saved checkpoint at iteration {run.iteration} to {r.save}")
            if preempted:
                log.message(f"exiting at iteration {run.iteration} ({signals.name} received)")
                break
            if exiting:
                log.message(
                    f"exiting at iteration {run.iteration} (--exit-interval {r.exit_interval})"
                )
                break
    if r.save and saved != run.iteration and run.iteration >= r.train_iters:
        save(run)
        log.message(f"saved checkpoint at iteration {run.iteration} to {r.save}")
    log.close()
    return history
