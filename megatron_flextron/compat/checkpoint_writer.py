"""megatron's checkpoint writer without its helper process.

megatron's writer collects its results through a queue of a multiprocessing Manager, a spawned
server process (~360 MB) that outlives a tool killed with SIGKILL. A synchronous save puts to
that queue from this process only, so an in-process queue serves it and no helper process is
started (a private megatron name: guarded in tests/test_megatron_internals.py). On every device.
"""

from __future__ import annotations

import queue


def use_in_process_results_queue() -> None:
    """Before a synchronous ``dist_checkpointing.save``: the writer's results queue lives in
    this process (set once; a queue megatron already made is kept)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()
