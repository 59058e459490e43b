"""Save and exit on SIGTERM, as Megatron's ``--exit-signal-handler`` does.

A cluster preempts a job with SIGTERM and kills it (SIGKILL) a grace period later (SLURM's
KillWait, torchrun's 30 s shutdown timeout). The handler only records the signal; once per
iteration every rank joins one all-reduce of that record, so all ranks agree to save at the same
iteration even when the signal reached only some of them (torchrun forwards it to its own
workers only, SLURM to the processes of each node).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class ExitSignalHandler:
    """``with ExitSignalHandler(enabled) as h: ... if h.received(): save and exit``.

    Installs the handler only in the main thread (Python's rule) and restores the previous
    one on exit; disabled, ``received()`` is False without any communication."""

    def __init__(self, enabled: bool = True, signum: int = signal.SIGTERM):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum = signum
        self._received = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self._received = True

    def __enter__(self) -> "ExitSignalHandler":
        if self.enabled:
            self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(self.signum, self._previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def received(self, device: torch.device) -> bool:
        """Collective (every rank calls it at the same iteration): did any rank get the signal?"""
        if not self.enabled:
            return False
        flag = torch.tensor([float(self._received)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
