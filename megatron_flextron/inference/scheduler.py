"""The serving loop: one thread owns the model and runs engine steps while any request is live.

Requests submitted between two steps join the running batch at the next one (continuous batching,
engine.py); each request's updates (new text, then its result) go to its :class:`Handle`, which
the HTTP thread that submitted it reads, streaming or waiting for the end. A cancelled handle (a
client that went away, a server shutting down) leaves the batch at the next step.

Under TP/PP rank 0 runs the loop and broadcasts every tick (requests added, requests cancelled,
whether to step, stop) before acting on it; the other ranks run :func:`follow`, which acts on the
same ticks, so every rank makes the same engine calls in the same order.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch.distributed as dist

from megatron_flextron.inference.engine import ElasticGenerator, Request, Result, Update


class Handle:
    """One request in the scheduler: its id, and the queue that gets ``(rid, update, error)``
    for each of its updates (several handles may share one queue)."""

    def __init__(self, rid: int, request: Request, sink: "queue.Queue"):
        self.rid, self.request, self.sink = rid, request, sink
        self.result: Optional[Result] = None

    def wait(self) -> Result:
        """The result (for a handle with a queue of its own); raises what generation raised."""
        while self.result is None:
            _, update, error = self.sink.get()
            if error is not None:
                raise error
            self.result = update.result
        return self.result


@dataclass
class Tick:
    adds: List[Tuple[int, Request, int]] = field(default_factory=list)  # (rid, request, seed)
    cancels: List[int] = field(default_factory=list)
    stop: bool = False


def _broadcast(tick: Optional[Tick]) -> Tick:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [tick]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return tick


def _apply(generator: ElasticGenerator, tick: Tick) -> List[Update]:
    """What every rank does with a tick: add, cancel, then one step if anything is live."""
    updates = []
    for rid, request, seed in tick.adds:
        generator.add(rid, request, seed)
    for rid in tick.cancels:
        update = generator.cancel(rid)
        if update is not None:
            updates.append(update)
    if tick.stop:
        for rid in list(generator.live):
            updates.append(generator.cancel(rid))
    elif generator.busy:
        updates += generator.step()
    return updates


class Scheduler:
    """Rank 0's loop. ``submit`` and ``cancel`` are thread-safe; ``stop`` cancels what is live."""

    def __init__(self, generator: ElasticGenerator):
        self.generator = generator
        self.inbox: "queue.Queue[tuple]" = queue.Queue()
        self.handles = {}
        self.thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self.steps = 0  # engine steps run (observability, tests)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def submit(self, requests: List[Request], sink: Optional["queue.Queue"] = None
               ) -> List[Handle]:
        """Queue requests; their updates go to ``sink`` (default: a queue per handle)."""
        handles = []
        for request in requests:
            rid = self.generator.new_id()
            seed = request.sampling.seed
            if seed is None:  # drawn here, so that every rank draws the same tokens
                seed = random.SystemRandom().randrange(2**63)
            handle = Handle(rid, request, sink if sink is not None else queue.Queue())
            handles.append(handle)
            self.inbox.put(("add", (rid, request, seed), handle))
        return handles

    def cancel(self, handles: List[Handle]) -> None:
        for handle in handles:
            if handle.result is None:
                self.inbox.put(("cancel", handle.rid, None))

    def stop(self) -> None:
        """Cancel every live request (their clients get "cancelled") and end the loop."""
        if self.thread.is_alive():
            self.inbox.put(("stop", None, None))
            self.thread.join()

    def _loop(self) -> None:
        while True:
            tick = Tick()
            block = not self.generator.busy
            while True:
                try:
                    kind, item, handle = self.inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if kind == "add":
                    tick.adds.append(item)
                    self.handles[item[0]] = handle
                elif kind == "cancel":
                    tick.cancels.append(item)
                else:
                    tick.stop = True
            _broadcast(tick)
            try:
                updates = _apply(self.generator, tick)
                self.steps += 1
            except Exception as e:  # every live request fails with it; the server keeps serving
                for rid, handle in self.handles.items():
                    handle.sink.put((rid, None, e))
                self.handles.clear()
                self.generator.reset()
                updates = []
            for update in updates:
                handle = self.handles.get(update.rid)
                if handle is not None:
                    handle.sink.put((update.rid, update, None))
                    if update.result is not None:
                        handle.result = update.result
                        del self.handles[update.rid]
            if tick.stop:
                return


def follow(generator: ElasticGenerator) -> None:
    """Ranks other than 0: act on every tick rank 0 broadcasts, until it stops."""
    while True:
        tick = _broadcast(None)
        try:
            _apply(generator, tick)
        except Exception:  # rank 0 hit the same error and reports it to its clients
            generator.reset()
        if tick.stop:
            return
