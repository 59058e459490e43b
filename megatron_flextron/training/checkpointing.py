"""Training checkpoints: the flextron format plus optimizer state, LR schedule and progress.

``DIR/iter_NNNNNNN/`` is one megatron-core distributed checkpoint of
``{"model", "optimizer", "opt_param_scheduler", "iteration", "consumed_train_samples"}`` (megatron's
keys). Every rank writes its shards into ``iter_NNNNNNN.tmp``; once all are done rank 0 renames
it, writes ``flextron_config.json`` and updates ``latest_checkpointed_iteration.txt`` last, so a
kill at any moment leaves the previous checkpoint as the latest complete one. The model part is
an ordinary flextron checkpoint: tools/evaluate.py and tools/convert_checkpoint.py read it.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Tuple

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_flextron.checkpoint.flextron import (
    TRACKER_FILE,
    check_stored_shapes,
    iteration_dir,
    load_common,
    load_dist_checkpoint,
    load_flextron_into_model,
    load_state_strict,
    read_config,
    write_metadata,
)
from megatron_flextron.checkpoint.io import dist_save
from megatron_flextron.checkpoint.state import Checkpoint, CheckpointError
from megatron_flextron.compat.torch_adam import (
    prepare_torch_adam_for_loading,
    unshare_torch_adam_steps,
)
from megatron_flextron.config import ElasticConfig, ModelConfig
from megatron_flextron.elastic.subnetwork import unwrap_model

# the distributed optimizer's state gathered per parameter: resumable at another DP size
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def has_checkpoint(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, TRACKER_FILE))


def check_resume_source(save: str, load: Optional[str]) -> None:
    """Resuming from ``save`` while ``load`` names another architecture is refused, naming both
    folders and what differs: the run would otherwise continue the --save model and silently
    ignore the --load one it was asked to train."""
    if not load or os.path.abspath(load) == os.path.abspath(save):
        return
    saved, loaded = read_config(save)["model"], read_config(load)["model"]
    differ = [k for k in sorted(set(saved) | set(loaded)) if saved.get(k) != loaded.get(k)]
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)} vs {loaded.get(k)}" for k in differ[:4])
        raise CheckpointError(
            f"--save {save} holds a training checkpoint of another architecture than --load "
            f"{load} ({shown}): resuming would ignore --load; --save to a new folder"
        )


def save_training_checkpoint(
    path: str,
    iteration: int,
    model,
    optimizer,
    scheduler,
    consumed_train_samples: int,
    model_cfg: ModelConfig,
    elastic_cfg: ElasticConfig,
    metadata: dict,
    tokenizer_dir: Optional[str],
    extra: Optional[dict] = None,
) -> None:
    """Collective: every rank calls it. Returns when the checkpoint is complete on disk.
    ``extra``: more (replicated) training state for the common part, e.g. the joint router."""
    final = iteration_dir(path, iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        os.makedirs(tmp)
    dist.barrier()
    model_sd = unwrap_model(model).sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA),
        "opt_param_scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "consumed_train_samples": consumed_train_samples,
        **(extra or {}),
    }
    try:
        dist_save(state, tmp)
    except BaseException:
        if dist.get_rank() == 0:  # no half-written iteration left behind (a full disk)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.isdir(final):  # an older run's checkpoint of the same iteration
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpt = Checkpoint(
            model=model_cfg,
            state={},
            tokenizer_dir=tokenizer_dir,
            elastic=elastic_cfg,
            metadata=metadata,
        )
        tp = parallel_state.get_tensor_model_parallel_world_size()
        write_metadata(path, ckpt, tp, iteration)
    dist.barrier()


def load_training_checkpoint(
    path: str, model, optimizer, scheduler, load_optim: bool = True
) -> Tuple[int, int, dict]:
    """Load weights, and, from a training checkpoint, optimizer state, schedule and progress.

    Returns (iteration, consumed_train_samples, common state); (0, 0, ...) for a converted
    (release) checkpoint.
    """
    config = read_config(path)
    shards = iteration_dir(path)
    common = load_common(shards)
    if "iteration" not in common or not load_optim:
        load_flextron_into_model(model, path)
        optimizer.reload_model_params()  # bf16/fp16: the fp32 master copies follow the weights
        return (
            int(common.get("iteration", 0)),
            int(common.get("consumed_train_samples", 0)),
            common,
        )
    check_stored_shapes(path, ModelConfig.from_dict(config["model"]))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config["dealt_tensor_parallel_size"] != tp:
        raise CheckpointError(
            f"{path}: optimizer state was saved at TP={config['dealt_tensor_parallel_size']}; "
            f"resume at that TP size, or pass --no-load-optim to load the weights at TP={tp}"
        )
    gpt = unwrap_model(model)
    model_sd = gpt.sharded_state_dict()
    prepare_torch_adam_for_loading(optimizer)
    request = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_METADATA
        ),
    }
    loaded = load_dist_checkpoint(request, shards)
    load_state_strict(gpt, loaded["model"], canonical=False)
    optimizer.load_state_dict(loaded["optimizer"])
    unshare_torch_adam_steps(optimizer)
    scheduler.load_state_dict(common["opt_param_scheduler"])
    return int(common["iteration"]), int(common["consumed_train_samples"]), common
