"""Run a test body on N gloo ranks (spawned processes), megatron-core on CPU.

The body is a module-level function ``body(rank, world_size, *args)`` (pickled by name); it
calls ``initialize_model_parallel`` itself. Any rank's exception fails the test with its traceback.
"""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, body, world_size: int, port: int, args: tuple) -> None:
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from megatron_flextron.parallel import destroy_model_parallel

    try:
        body(rank, world_size, *args)
    finally:
        destroy_model_parallel()


def run_distributed(body, world_size: int, *args) -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # megatron's import-time warnings, per rank
    mp.start_processes(
        _worker,
        args=(body, world_size, free_port(), args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
