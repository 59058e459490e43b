"""Training logs: megatron-style lines on stdout, tensorboard scalars and a JSON-lines file.

Only global rank 0 writes; the numbers it writes are already reduced over all ranks.
"""

from __future__ import annotations

import json
import os
import socket
import time

import torch.distributed as dist

from megatron_flextron.elastic.subnetwork import Subnetwork, count_parameters

# per-budget stats printed under their own short names; any other (a policy's) in full
_SHORT = {"lm loss": "lm", "kd loss": "kd"}


class TrainingLogger:
    def __init__(self, args):
        self.args = args
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.writer = None
        self.metrics = None
        self.started = time.time()
        self.first_iteration = 0
        self.seen = 0

    def message(self, text: str) -> None:
        if self.rank0:
            print(text, flush=True)

    def start(self, run) -> None:
        """Collective (every rank calls it): the run's header, with the host of every rank."""
        a = self.args
        self.first_iteration = run.iteration
        hosts = _rank_hosts()
        if not self.rank0:
            return
        if a.run.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=a.run.tensorboard_dir)
        if a.run.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(a.run.metrics_file)), exist_ok=True)
            self.metrics = open(a.run.metrics_file, "a")
        m, e, par = run.model_cfg, run.elastic_cfg, a.parallel
        full = count_parameters(Subnetwork.full(m), m)["total"]
        how = "resuming" if run.iteration else "starting"
        self.message(
            f"{how} from {run.source} at iteration {run.iteration} | {m.family} "
            f"{m.num_layers} layers, hidden {m.hidden_size}, {full / 1e6:.1f}M parameters | "
            f"TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} "
            f"DP={a.data_parallel_size} | micro-batches per iteration {a.num_microbatches}"
        )
        self.message("  hosts: " + "; ".join(f"{h} ranks {r}" for h, r in hosts.items()))
        policy = run.step.policy
        if policy.origin:
            self.message(f"  {policy.kind}: starting from {policy.origin}")
        for budget in run.step.budget_keys:
            self.message(f"  budget {budget:g}: {policy.describe(budget)}")
        self.message(
            f"  distillation: {a.elastic.distill}; MLP choices {list(e.mlp_choices)}, "
            f"head choices {list(e.head_choices)}"
        )

    def iteration(self, stats: dict) -> None:
        if not self.rank0:
            return
        a = self.args
        it = stats["iteration"]
        self.seen += 1
        tokens = a.data.global_batch_size * a.data.seq_length
        elapsed = time.time() - self.started
        eta = elapsed / self.seen * (a.run.train_iters - it)
        if self.metrics:
            self.metrics.write(json.dumps(stats) + "\n")
            self.metrics.flush()
        if self.writer:
            self._tensorboard(stats, tokens)
        if (
            it % a.run.log_interval == 0
            or it == a.run.train_iters
            or it == self.first_iteration + 1
        ):
            per_budget = " | ".join(
                f"{b}: "
                + " ".join(
                    f"{_SHORT.get(key, key)} {value:.4f}"
                    for key, value in v.items()
                    if key != "n" and (value or key != "kd loss")
                )
                for b, v in stats["budgets"].items()
            )
            self.message(
                f" iteration {it:6d}/{a.run.train_iters} | lr {stats['lr']:.3e} | "
                f"lm loss {stats['lm loss']:.4f} | {per_budget} | grad norm "
                f"{stats['grad_norm']:.3f} | {tokens / stats['time']:.0f} tokens/s | "
                f"{stats['time']:.2f} s/it | ETA {eta / 60:.1f} min"
            )
        if stats.get("eval"):
            self.message(
                f" validation at iteration {it}: "
                + " | ".join(f"budget {b}: loss {v:.4f}" for b, v in stats["eval"].items())
            )

    def _tensorboard(self, stats: dict, tokens: int) -> None:
        it, w = stats["iteration"], self.writer
        w.add_scalar("lm loss", stats["lm loss"], it)
        w.add_scalar("kd loss", stats["kd loss"], it)
        w.add_scalar("learning-rate", stats["lr"], it)
        w.add_scalar("grad-norm", stats["grad_norm"], it)
        w.add_scalar("tokens-per-sec", tokens / stats["time"], it)
        for budget, v in stats["budgets"].items():
            for key, value in v.items():  # losses and the budget policy's stats
                if key != "n":
                    w.add_scalar(f"{key}/budget {budget}", value, it)
        for budget, loss in (stats.get("eval") or {}).items():
            w.add_scalar(f"validation loss/budget {budget}", loss, it)
        w.flush()

    def close(self) -> None:
        for f in (self.writer, self.metrics):
            if f is not None:
                f.close()


def _rank_hosts() -> dict:
    """{hostname: its global ranks, "0,1"}, in rank order: where a multi-node run's ranks run."""
    names = [socket.gethostname()]
    if dist.is_initialized():
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, socket.gethostname())
    ranks = {}
    for rank, name in enumerate(names):
        ranks.setdefault(name, []).append(rank)
    return {h: ",".join(map(str, r)) for h, r in ranks.items()}
