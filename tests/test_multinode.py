"""Two torchrun nodes for real: two hosts (network namespaces with their own addresses and
hostnames, scripts/test_hosts.sh), one torchrun agent each, a c10d rendezvous on node0, and a
tiny elastic model with its tensor-parallel pair split across the hosts. The run equals the
single-node run; a lost node that comes back resumes the job from the last checkpoint to the
uninterrupted result; a lost node that does not come back ends the job within a bounded time."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch
from helpers import train_history, training_flags, write_training_setup
from launch import ROOT, clean_env, log_text, metrics, start, stop, torchrun_cmd, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("megatron_single_process")]

ITERS = 24
FLAGS = dict(
    train_iters=ITERS,
    seq_length=32,
    global_batch_size=8,
    eval_interval=0,
    tensor_model_parallel_size=2,
    weight_decay=0.1,
    save_interval=4,
)
# seconds a rendezvous round waits for a lost node to rejoin (torchrun --rdzv-conf join_timeout):
# long enough for a restarted agent under load, short for the node that never comes back
JOIN_TIMEOUT, SHORT_JOIN_TIMEOUT = 180, 20


def _hosts_script(*args: str) -> None:
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "test_hosts.sh"), *args], check=True)


@pytest.fixture(scope="module")
def hosts():
    """Two fresh hosts; every process on them is killed and they are deleted afterwards, also
    when a test fails."""
    name = f"fxmn{os.getpid()}"
    _hosts_script("up", name)
    try:
        yield name
    finally:
        _hosts_script("down", name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("train")))


def _agent(hosts: str, node: int, argv: list, log, join_timeout: int = JOIN_TIMEOUT):
    """torchrun on host ``node``: one worker, 2 nodes, rendezvous at node0:29500."""
    cmd = torchrun_cmd(
        argv,
        1,
        "node0:29500",
        nnodes="2",
        node_rank=node,
        rdzv_id="flextron-test",
        max_restarts=1,
        rdzv_conf=f"join_timeout={join_timeout}",
    )
    prefix = ("bash", os.path.join(ROOT, "scripts", "test_hosts.sh"), "run", hosts, str(node))
    # as examples/pretrain_flextron.sh sets it: with the shared TCPStore (torch 2.13) an agent
    # that rejoins a later round waits forever for MASTER_ADDR, which the surviving rank-0 agent
    # published in round 0 only
    env = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return start(cmd, env, log, prefix=prefix)


def _two_nodes(hosts: str, argv: list, tmp_path, join_timeout: int = JOIN_TIMEOUT):
    procs = [_agent(hosts, n, argv, tmp_path / f"node{n}.log", join_timeout) for n in (0, 1)]
    return procs, [tmp_path / f"node{n}.log" for n in (0, 1)]


def _finish(procs, logs, timeout: float = 300) -> None:
    try:
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=timeout) == 0, log_text(log)[-3000:]
    finally:
        for proc in procs:
            stop(proc)


def _assert_same_checkpoint(a_dir, b_dir) -> None:
    from megatron_flextron.checkpoint.flextron import read_flextron

    a, b = read_flextron(str(a_dir)), read_flextron(str(b_dir))
    assert a.state.keys() == b.state.keys()
    for name in a.state:
        assert torch.equal(a.state[name], b.state[name]), name


@pytest.fixture(scope="module")
def two_node_run(hosts, setup, tmp_path_factory):
    """The uninterrupted two-node run: (save dir, per-iteration metrics, wall seconds, logs)."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    argv = training_flags(setup, **FLAGS, save=str(tmp / "ckpt"), metrics_file=str(tmp / "m"))
    begin = time.time()
    procs, logs = _two_nodes(hosts, argv, tmp)
    _finish(procs, logs)
    logged = log_text(logs[0]) + log_text(logs[1])  # rank 0 logs, on either node
    return tmp / "ckpt", metrics(tmp / "m"), time.time() - begin, logged


def test_two_node_run_equals_the_single_node_run(setup, two_node_run, tmp_path):
    save, rows, seconds, logged = two_node_run
    print(f"two-node run: {seconds:.1f} s")
    assert "  hosts: node0 ranks 0; node1 ranks 1" in logged or (
        "  hosts: node1 ranks 0; node0 ranks 1" in logged  # rank order: rendezvous order
    ), logged[-3000:]
    assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1))
    one = train_history(
        tmp_path, "one", 2, training_flags(setup, **FLAGS, save=str(tmp_path / "ckpt"))
    )
    assert [r["lm loss"] for r in rows] == [r["lm loss"] for r in one]  # exactly
    assert [r["budgets"] for r in rows] == [r["budgets"] for r in one]
    _assert_same_checkpoint(save, tmp_path / "ckpt")


def test_lost_node_that_comes_back_resumes_from_the_last_checkpoint(
    hosts, setup, two_node_run, tmp_path
):
    save, path = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = training_flags(setup, **FLAGS, save=str(save), metrics_file=str(path))
    procs, logs = _two_nodes(hosts, argv, tmp_path)
    tracker = save / "latest_checkpointed_iteration.txt"
    try:
        wait_for(tracker.exists, 300, "first checkpoint", procs)
        wait_for(lambda: len(metrics(path)) >= 5, 300, "iteration 5", procs)
        _hosts_script("kill", hosts, "1")  # node1 is lost: its agent and worker die
        lost_at, killed = time.time(), metrics(path)[-1]["iteration"]
        assert procs[1].wait(timeout=30) != 0
        # node0's worker fails in its next collective (gloo: "Connection reset by peer"); its
        # agent ends the attempt and waits in a new rendezvous round for two nodes
        wait_for(lambda: "failed (exitcode: 1)" in log_text(logs[0]), 120, "node0's failure")
        detected = time.time() - lost_at
        procs[1] = _agent(hosts, 1, argv, tmp_path / "node1-again.log")
        logs[1] = tmp_path / "node1-again.log"
        _finish(procs, logs)
        recovered = time.time() - lost_at
    finally:
        for proc in procs:
            stop(proc)
    print(f"lost at iteration {killed}; detected after {detected:.1f} s; done {recovered:.1f} s")
    assert "resuming from" in log_text(logs[0]) + log_text(logs[1])
    seen = {}
    for row in metrics(path):  # iterations after the last checkpoint ran twice, identically
        assert seen.setdefault(row["iteration"], row["lm loss"]) == row["lm loss"]
    assert sorted(seen) == list(range(1, ITERS + 1)) and killed < ITERS
    assert tracker.read_text() == str(ITERS)
    _assert_same_checkpoint(two_node_run[0], save)


def test_lost_node_that_does_not_come_back_ends_the_job_in_bounded_time(hosts, setup, tmp_path):
    path = tmp_path / "metrics.jsonl"
    argv = training_flags(
        setup, **dict(FLAGS, train_iters=400), save=str(tmp_path / "ckpt"), metrics_file=str(path)
    )
    procs, logs = _two_nodes(hosts, argv, tmp_path, SHORT_JOIN_TIMEOUT)
    try:
        wait_for(lambda: len(metrics(path)) >= 2, 300, "iteration 2", procs)
        _hosts_script("kill", hosts, "1")
        lost_at = time.time()
        rc = procs[0].wait(timeout=SHORT_JOIN_TIMEOUT + 120)
        ended = time.time() - lost_at
    finally:
        for proc in procs:
            stop(proc)
    out = log_text(logs[0])
    print(f"node0 ended {ended:.1f} s after node1 was lost")
    assert rc != 0 and ended < SHORT_JOIN_TIMEOUT + 120
    assert "RendezvousTimeoutError" in out, out[-3000:]
