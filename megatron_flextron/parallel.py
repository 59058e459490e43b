"""Process groups and seeds: torch.distributed + megatron parallel_state, on GPU or CPU (gloo)."""

from __future__ import annotations

import contextlib
import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_flextron.compat import apply_cpu_shims
from megatron_flextron.compat.torchrun import per_attempt_store


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_s: int = 600,
    expert_model_parallel_size: int = 1,
) -> None:
    """Init torch.distributed from the torchrun environment (or a single process) and megatron."""
    apply_cpu_shims()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a single process outside torchrun: any free port
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=timeout_s)
        store = per_attempt_store(timeout)
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timeout,
            **(
                {}
                if store is None
                else dict(
                    store=store,
                    rank=int(os.environ["RANK"]),
                    world_size=int(os.environ["WORLD_SIZE"]),
                )
            ),
        )
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * pipeline_model_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by TP {tensor_model_parallel_size} x "
            f"PP {pipeline_model_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    set_seed(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Random draws inside come from ``seed`` and every generator this rank uses (CPU and its
    GPU) is restored afterwards: identical replicated modules (routers) on every rank without
    disturbing the rank's own random state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def current_device() -> torch.device:
    """This rank's device: its GPU (set by initialize_model_parallel), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_grads(params, sum_groups=(), average_group=None) -> None:
    """Reduce the gradients of parameters kept outside megatron's DDP (the routers) in one flat
    buffer on this rank's device (NCCL reduces GPU tensors only): summed over ``sum_groups``,
    then averaged over ``average_group``. Missing gradients count as zeros."""
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
    )
    home = flat.device
    flat = flat.to(current_device())
    for group in sum_groups:
        dist.all_reduce(flat, group=group)
    if average_group is not None:
        dist.all_reduce(flat, group=average_group)
        flat = flat / dist.get_world_size(average_group)
    flat = flat.to(home)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def data_parallel_mean(value: float) -> float:
    """The mean of a number over the data-parallel ranks (collective over that group)."""
    total = torch.tensor(value, device=current_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total.item() / parallel_state.get_data_parallel_world_size()


def destroy_model_parallel() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_tool(body, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
    """What every command-line tool does around its work: ``body()`` runs inside megatron's
    process groups, which are torn down whatever happens; bad input becomes one line and exit
    status 2 (``megatron_flextron.cli.run_main``). Returns (exit status, what ``body`` returned)."""
    from megatron_flextron.cli import run_main

    result = []

    def inside():
        try:
            initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
            result.append(body())
        finally:
            destroy_model_parallel()

    status = run_main(inside)
    return status, (result[0] if result else None)
