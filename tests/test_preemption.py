"""SIGTERM (a cluster's preemption) makes the trainer save and exit cleanly, every rank at the
same iteration, and the resumed run equals the uninterrupted one (--exit-signal-handler)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from distributed import free_port
from helpers import train_history, training_flags, write_training_setup
from launch import clean_env, log_text, metrics, start, stop, torchrun_cmd, wait_for, workers

pytestmark = pytest.mark.usefixtures("megatron_single_process")

# TP across the two ranks: a rank that misses the signal would hang in the next all-reduce
FLAGS = dict(
    train_iters=60,
    seq_length=32,
    global_batch_size=8,
    eval_interval=0,
    tensor_model_parallel_size=2,
    weight_decay=0.1,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, megatron_single_process):
    return write_training_setup(str(tmp_path_factory.mktemp("train")))


def test_handler_records_the_signal_and_restores_the_previous_handler():
    from megatron_flextron.training.signals import ExitSignalHandler

    before = signal.getsignal(signal.SIGTERM)
    with ExitSignalHandler() as handler:
        assert not handler.received(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, the process lives on
        assert handler.received(torch.device("cpu"))
    assert signal.getsignal(signal.SIGTERM) is before
    with ExitSignalHandler(enabled=False) as handler:  # --no-exit-signal-handler
        assert signal.getsignal(signal.SIGTERM) is before and not handler.received(None)


def test_sigterm_to_one_rank_saves_on_every_rank_exits_0_and_the_resumed_run_equals_the_whole(
    setup, tmp_path
):
    from megatron_flextron.checkpoint.flextron import read_flextron

    save, path = tmp_path / "run", tmp_path / "metrics.jsonl"
    argv = training_flags(setup, **FLAGS, save=str(save), metrics_file=str(path))
    log = tmp_path / "torchrun.log"
    proc = start(torchrun_cmd(argv, 2, f"127.0.0.1:{free_port()}"), clean_env(), log)
    try:
        wait_for(lambda: len(metrics(path)) >= 2, 300, "iteration 2", [proc])
        # rank 1 only: rank 0 (which logs) never sees the signal and must still save with it
        workers(proc)[1].send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=180)
    finally:
        stop(proc)
    out = log_text(log)
    first = metrics(path)
    stopped = first[-1]["iteration"]
    assert rc == 0, out[-3000:]
    assert 2 <= stopped < FLAGS["train_iters"], out[-3000:]
    assert f"exiting at iteration {stopped} (SIGTERM received)" in out, out[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    assert sorted(os.listdir(save)) == [
        "flextron_config.json",
        f"iter_{stopped:07d}",
        "latest_checkpointed_iteration.txt",
        "tokenizer",
    ]

    rest = train_history(tmp_path, "rest", 2, training_flags(setup, **FLAGS, save=str(save)))
    whole_dir = tmp_path / "whole"
    whole = train_history(tmp_path, "whole", 2, training_flags(setup, **FLAGS, save=str(whole_dir)))
    assert [h["iteration"] for h in rest] == list(range(stopped + 1, FLAGS["train_iters"] + 1))
    assert [h["lm loss"] for h in first + rest] == [h["lm loss"] for h in whole]  # exactly
    a, b = read_flextron(str(whole_dir)), read_flextron(str(save))
    assert a.state.keys() == b.state.keys()
    for name in a.state:
        assert torch.equal(a.state[name], b.state[name]), name
