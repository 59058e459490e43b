"""examples/slurm/pretrain_flextron.sbatch on a real SLURM (scripts/slurm_cluster.sh: slurmctld
and two slurmd on two network-namespace hosts): node 0 converts and tokenizes once while node 1
waits, both nodes train (one torchrun each, a c10d rendezvous); a preemption (`scancel
--signal=TERM`) makes the trainer save and stop, and the resubmitted job resumes from that
checkpoint, finishes and evaluates on node 0. CPU preset (smoke), a tiny model as the source,
gloo."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from helpers import write_training_setup
from launch import ROOT, clean_env, metrics, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("megatron_single_process")]

SBATCH = "examples/slurm/pretrain_flextron.sbatch"
TOOLS = ("slurmctld", "slurmd", "sbatch", "scancel", "munged", "mungekey", "ip", "unshare")
# CPU nodes: the script's GPU directives overridden on the command line, one worker per node
CPU = ("--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(hosts id, SLURM_CONF) of a fresh two-node cluster; daemons, jobs and hosts are removed
    afterwards, also when a test fails."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:  # CI installs them (scripts/setup_slurm.sh): a missing one is a failure
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup_slurm.sh (as root)")
    name, state = f"fxsl{os.getpid()}", tmp_path_factory.mktemp("slurm")
    script = os.path.join(ROOT, "scripts", "slurm_cluster.sh")
    try:
        subprocess.run(["bash", script, "up", name, str(state)], check=True, timeout=120)
        yield name, str(state / "slurm.conf")
    finally:
        subprocess.run(["bash", script, "down", name, str(state)], timeout=120)


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    """The job's environment: the shared OUT folder, PRESET=smoke, a tiny model to convert."""
    tmp = tmp_path_factory.mktemp("slurm_run")
    source = write_training_setup(str(tmp / "source"))["load"]
    env = clean_env(
        PRESET="smoke",
        OUT=str(tmp / "out"),
        SOURCE=source,
        SOURCE_LOADER="flextron",
        SLURM_CONF=cluster[1],
    )
    return tmp / "out", env


def _on_node0(cluster, env, *cmd, timeout=600) -> subprocess.CompletedProcess:
    hosts = os.path.join(ROOT, "scripts", "test_hosts.sh")
    return subprocess.run(
        ["bash", hosts, "run", cluster[0], "0", *cmd],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _job_id(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0 and out.stdout.startswith("Submitted batch job"), out
    return out.stdout.split()[-1]


def _node_logs(out_dir, job: str) -> list:
    return [(out_dir / "logs" / f"flextron-{job}-node{n}.log").read_text() for n in (0, 1)]


def _table_rows(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith(("| 0.", "| 1 "))]


def _hosts_line(text: str) -> bool:
    """The trainer's header: one rank on each node (rank 0 on either, by rendezvous order)."""
    return (
        "hosts: node0 ranks 0; node1 ranks 1" in text
        or "hosts: node1 ranks 0; node0 ranks 1" in text
    )


def test_sbatch_job_preempted_then_resubmitted(cluster, run):
    """Job 1: node 0 converts and tokenizes once, node 1 waits, both train; a preemption
    (scancel --signal=TERM) saves and stops it before evaluation. Job 2, the same submission:
    no conversion, resumes from that checkpoint, trains to the end on both nodes, evaluates."""
    out_dir, env = run
    save, path = out_dir / "elastic", out_dir / "metrics.jsonl"
    batch = ("--output", str(out_dir.parent / "batch-%j.out"), SBATCH, "--train-iters", "200")
    begin = time.time()
    job = _job_id(_on_node0(cluster, env, "sbatch", *CPU, *batch))
    wait_for(lambda: len(metrics(path)) >= 2, 900, "iteration 2 of the first job")
    sent = time.time()
    assert _on_node0(cluster, env, "scancel", "--signal=TERM", job).returncode == 0
    state = lambda: _on_node0(cluster, env, "squeue", "-h", "-j", job, "-o", "%T").stdout.strip()  # noqa: E731
    wait_for(lambda: state() in ("", "FAILED", "COMPLETED", "CANCELLED"), 300, "the job's end")
    node0, node1 = _node_logs(out_dir, job)
    both, stopped = node0 + node1, metrics(path)[-1]["iteration"]
    print(f"job {job}: {sent - begin:.1f} s to iteration 2; stopped at iteration {stopped} "
          f"{time.time() - sent:.1f} s after SIGTERM")  # fmt: skip
    assert both.count("== 1. convert + rank importance") == 1 and "== 1. convert" in node0
    assert "== waiting for node 0" in node1 and _hosts_line(both), both[-3000:]
    assert 2 <= stopped < 200, both[-3000:]
    assert f"exiting at iteration {stopped} (SIGTERM received)" in both, both[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    assert f"== SIGTERM: training stopped; checkpoint in {save} at iteration {stopped}" in node0
    assert not _table_rows(node0)  # the preempted job evaluates nothing

    begin = time.time()
    again = _on_node0(cluster, env, "sbatch", "--parsable", "--wait", *CPU, *batch)
    resumed = again.stdout.strip().split(";")[0]
    node0, node1 = _node_logs(out_dir, resumed)
    print(f"resubmitted job {resumed}: {time.time() - begin:.1f} s")
    assert again.returncode == 0, (again.stderr, node0[-3000:], node1[-3000:])
    both = node0 + node1
    assert "== 1. convert" not in both and _hosts_line(both)
    assert f"resuming from {save} at iteration {stopped}" in both
    assert [m["iteration"] for m in metrics(path)] == list(range(1, 201))
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "200"
    # node 0 evaluates the converted and the trained checkpoint: a row per budget each time
    assert len(_table_rows(node0)) == 8 and not _table_rows(node1), node0[-3000:]
