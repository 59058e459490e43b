"""Elastic continued pretraining on megatron-core (the body of tools/pretrain_flextron.py).

megatron's process groups, GPTModel (elastic layer spec), DistributedDataParallel, optimizer and
OptimizerParamScheduler, pipeline schedules and GPTDataset; the Flextron parts are the per
micro-batch sub-network sampling with distillation (ElasticStep) and the weight decay restricted
to the trained slices (ElasticWeightDecay). Runs under torchrun (one node or many) or as a single
process; resumes from the newest checkpoint in ``--save`` when there is one.
"""

from __future__ import annotations

import math
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

from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.checkpoint.flextron import load_flextron_into_model, read_config
from megatron_flextron.data.gpt_data import build_gpt_datasets, rank_microbatches
from megatron_flextron.data.tokenizer import build_tokenizer
from megatron_flextron.elastic import build_gpt_model, set_subnetwork
from megatron_flextron.elastic.weight_decay import ElasticWeightDecay
from megatron_flextron.parallel import current_device, initialize_model_parallel
from megatron_flextron.training.arguments import TrainingArgs
from megatron_flextron.training.checkpointing import (
    has_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from megatron_flextron.training.elastic_step import ElasticStep
from megatron_flextron.training.guards import check_parameters, check_step
from megatron_flextron.lm_step import forward_backward
from megatron_flextron.routers.sampling import BudgetSampler, budget_subnetwork


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
        default = (1.0, 0.75, 0.5, 0.25)
        elastic = ElasticConfig.from_ratios(
            model_cfg, e.mlp_choices or default, e.head_choices or default, tp
        )
    for width in elastic.mlp_choices:
        if width % tp:
            raise ValueError(f"MLP choice {width} is not divisible by TP size {tp}")
    return elastic


def _build_model(args: TrainingArgs, model_cfg: ModelConfig):
    p = args.parallel
    tconfig = model_cfg.transformer_config(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, _params_dtype(args)
    )
    model = build_gpt_model(model_cfg, tconfig, elastic=True).to(current_device())
    if args.run.bf16 or args.run.fp16:
        model = Float16Module(tconfig, model)
    return model, tconfig


def _frozen_teacher(args: TrainingArgs, model_cfg: ModelConfig):
    teacher, _ = _build_model(args, model_cfg)
    load_flextron_into_model(teacher, args.run.load)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _joint_router(args: TrainingArgs, model_cfg, elastic_cfg, common: dict):
    """--router joint: the router trained with the model, resumed from the checkpoint."""
    from megatron_flextron.routers.cost import CostModel, LatencyTable
    from megatron_flextron.routers.static import GumbelSchedule
    from megatron_flextron.training.joint_router import JointRouter

    e = args.elastic
    if e.router != "joint":
        return None
    table = LatencyTable.load(e.latency_table) if e.latency_table else None
    cost = CostModel(model_cfg, elastic_cfg, e.router_cost_metric, args.data.seq_length, table)
    joint = JointRouter(
        model_cfg,
        elastic_cfg,
        e.budget_list,
        cost,
        e.router_lr,
        e.router_budget_weight,
        e.budget_tolerance,
        args.run.seed,
        # anneal to the minimum temperature by 70% of the run, whatever its length
        GumbelSchedule(
            steps=args.run.train_iters, decay=math.log(10) / (0.7 * args.run.train_iters)
        ),
        e.router_layer_skipping,
    )
    if "joint_router" in common:
        joint.load_state_dict(common["joint_router"])
        joint.origin = "the training checkpoint's router (resumed)"
    elif args.run.load:
        joint.origin = joint.start_from(args.run.load, model_cfg, elastic_cfg)
    return joint


def _joint_token_routers(args: TrainingArgs, model, model_cfg, elastic_cfg, common: dict):
    """--router token: per-layer token routers trained with the model, resumed from the
    checkpoint."""
    from megatron_flextron.routers.cost import router_choices
    from megatron_flextron.routers.static import GumbelSchedule
    from megatron_flextron.training.joint_token_routers import JointTokenRouters

    e = args.elastic
    if e.router != "token":
        return None
    widths, _ = router_choices(model_cfg, elastic_cfg)
    steps = args.run.train_iters
    routers = JointTokenRouters(
        model,
        widths,
        e.budget_list,
        e.router_lr,
        e.router_budget_weight,
        e.budget_tolerance,
        args.run.seed,
        # anneal from the start temperature to 0.1 by 70% of the run: training then routes as
        # sharply as the argmax used at evaluation
        GumbelSchedule(
            tau_min=0.1, steps=steps, decay=math.log(GumbelSchedule.tau_start / 0.1) / (0.7 * steps)
        ),
    )
    if "token_routers" in common:
        routers.load_state_dict(common["token_routers"])
    return routers


def setup(args: TrainingArgs) -> Run:
    p, o, r, e, d = args.parallel, args.optimizer, args.run, args.elastic, args.data
    initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, r.seed)
    resuming = has_checkpoint(r.save)
    source = r.save if resuming else r.load
    config = read_config(source)
    model_cfg = ModelConfig.from_dict(config["model"])
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
        joint_router=_joint_router(args, model_cfg, elastic_cfg, common if resuming else {}),
        token_routers=_joint_token_routers(
            args, model, model_cfg, elastic_cfg, common if resuming else {}
        ),
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
    for router in run.step.routers:
        router.finish_grads()
    updated, grad_norm, _ = run.optimizer.step()
    check_step(stats, grad_norm, run.iteration + 1, skipped=not updated)
    for router in run.step.routers:
        router.step()
    run.scheduler.step(increment=1)
    run.iteration += 1
    run.consumed_train_samples += args.data.global_batch_size
    stats.update(iteration=run.iteration, lr=lr, grad_norm=grad_norm)
    return stats


def router_costs(run: Run) -> dict:
    """--router joint: the cost ratio of the router's (argmax) architecture for each budget;
    --router token: the mean MLP width fraction the routers used in the last evaluation."""
    if run.step.token_routers is not None:
        return dict(run.step.token_routers.eval_widths)
    joint = run.step.joint_router
    if joint is None:
        return {}
    full = joint.cost.full()
    out = {}
    for budget in joint.router.budgets:
        subnet = joint.router.choose(budget)
        out[f"{budget:g}"] = (
            joint.cost.of_subnetwork(subnet.mlp, subnet.heads, subnet.layers) / full
        )
    return out


def _data_parallel_mean(value: float) -> float:
    total = torch.tensor(value, device=current_device())
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total.item() / parallel_state.get_data_parallel_world_size()


def evaluate_budgets(run: Run) -> dict:
    """Validation loss of the full model and of each budget's sub-network (same batches)."""
    args = run.args
    if run.valid_data is None:
        return {}
    microbatches = _microbatches(run, run.valid_data, 0, args.run.eval_iters)
    losses = {}
    joint, token = run.step.joint_router, run.step.token_routers
    for budget in run.step.budget_keys:
        if joint is not None and budget < 1.0:  # the router's current architecture
            subnet = joint.router.choose(budget)
        elif token is not None:  # full size; budgets route each token's MLP width
            subnet = None
        else:
            subnet = budget_subnetwork(budget, run.model_cfg, run.elastic_cfg)
        set_subnetwork(run.model, subnet, run.model_cfg, run.elastic_cfg)
        if token is not None and budget < 1.0:
            token.dispatch(run.model, budget)
        with torch.no_grad():
            out = forward_backward(run.model, microbatches, forward_only=True)
        if token is not None and budget < 1.0:
            token.detach(run.model)
            token.eval_widths[f"{budget:g}"] = _data_parallel_mean(token.mean_width())
        losses[f"{budget:g}"] = _data_parallel_mean(out["loss"])
    set_subnetwork(run.model, None, run.model_cfg, run.elastic_cfg)
    return losses


def _router_states(step) -> Optional[dict]:
    states = {}
    if step.joint_router is not None:
        states["joint_router"] = step.joint_router.state_dict()
    if step.token_routers is not None:
        states["token_routers"] = step.token_routers.state_dict()
    return states or None


def save(run: Run) -> None:
    check_parameters(run.model, run.iteration)  # collective: never a non-finite checkpoint
    joint = run.step.joint_router
    metadata = dict(run.config.get("metadata") or {})
    metadata["training"] = {
        "iteration": run.iteration,
        "consumed_train_samples": run.consumed_train_samples,
        "tokens": run.consumed_train_samples * run.args.data.seq_length,
    }
    tokenizer = os.path.join(run.source, "tokenizer")
    routers = _router_states(run.step)  # collective: gathers the token routers of every stage
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
        extra=routers,
    )
    token = run.step.token_routers
    if token is not None and torch.distributed.get_rank() == 0:  # for --router dynamic
        from megatron_flextron.routers.token_training import save_token_routers

        layers = routers["token_routers"]["layers"]
        save_token_routers(
            run.args.run.save,
            [layer["router"] for layer in layers],
            token.widths,
            token.budgets,
            full_at_1=True,
        )
    if joint is not None and torch.distributed.get_rank() == 0:  # for --budget in the tools
        from megatron_flextron.routers.checkpoint import save_router

        e = run.args.elastic
        settings = {
            "metric": e.router_cost_metric,
            "seq_length": run.args.data.seq_length,
            "tolerance": e.budget_tolerance,
            "latency_table": joint.cost_table_dict,
            "trained": "jointly with the model",
        }
        save_router(run.args.run.save, joint.router, settings)
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
    while run.iteration < r.train_iters:
        start = time.time()
        stats = train_step(run)
        stats["time"] = time.time() - start
        if r.eval_interval and run.iteration % r.eval_interval == 0:
            stats["eval"] = evaluate_budgets(run)
            if run.step.routers:
                stats["router cost ratio"] = router_costs(run)
        log.iteration(stats)
        history.append(stats)
        exiting = bool(r.exit_interval) and run.iteration % r.exit_interval == 0
        if r.save and (exiting or (r.save_interval and run.iteration % r.save_interval == 0)):
            save(run)
            saved = run.iteration
            log.message(f"saved checkpoint at iteration {run.iteration} to {r.save}")
        if exiting:
            log.message(f"exiting at iteration {run.iteration} (--exit-interval {r.exit_interval})")
            break
    if r.save and saved != run.iteration and run.iteration >= r.train_iters:
        save(run)
        log.message(f"saved checkpoint at iteration {run.iteration} to {r.save}")
    log.close()
    return history
