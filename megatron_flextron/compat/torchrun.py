"""Workaround for process-group rendezvous after a torchrun restart (--max-restarts)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def per_attempt_store(timeout: timedelta):
    """Under torchrun restarts (--max-restarts), the agent's TCPStore outlives a failed attempt
    and still holds that attempt's process-group keys: the restarted ranks would read the dead
    ranks' addresses (gloo: "connectFullMesh failed ... Connection refused"). Prefix the keys
    with the attempt number. None when not launched by torchrun's agent store."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"flextron_attempt_{restart}", store)
