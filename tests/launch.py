"""Launch the trainer under real torchrun agents (one node or several) and watch its progress.

Every agent runs in its own session (process group), so a failing test kills it and its
workers whatever state they are in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env(**extra) -> dict:
    """The test process's environment without its own torch.distributed variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)
    return env


def torchrun_cmd(argv: list, nproc: int, rdzv: str, nnodes: str = "1:1", **flags) -> list:
    """``python -m torch.distributed.run ... tools/pretrain_flextron.py argv`` with a c10d
    rendezvous at ``rdzv`` (host:port); ``flags`` are further torchrun flags (node_rank=1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes]
    cmd += ["--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv]
    for key, value in flags.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd + [os.path.join(ROOT, "tools", "pretrain_flextron.py"), *argv]


def start(cmd: list, env: dict, log_path, prefix: tuple = ()) -> subprocess.Popen:
    """Start ``prefix + cmd`` (prefix: e.g. ``ip netns exec NS``) writing to ``log_path``."""
    log = open(log_path, "w")
    return subprocess.Popen(
        [*prefix, *cmd],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the agent's whole process group (its workers too) if still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def metrics(path) -> list:
    """The metrics file's rows (rank 0 writes one per logged iteration); [] before the first."""
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path).read().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def wait_for(condition, timeout: float, what: str, procs=()) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` on timeout or when a process in
    ``procs`` ends first."""
    deadline = time.time() + timeout
    while not condition():
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"waiting for {what}: a process ended first: {ended}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def workers(proc: subprocess.Popen) -> dict:
    """{global rank: psutil.Process} of the trainer workers under the agent ``proc``."""
    import psutil

    found = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "pretrain_flextron.py" in " ".join(p.cmdline()) and "RANK" in p.environ():
                found[int(p.environ()["RANK"])] = p
        except psutil.NoSuchProcess:
            pass
    return found


def log_text(path) -> str:
    return open(path).read()
