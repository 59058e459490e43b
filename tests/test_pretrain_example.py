"""The README's main command in its reduced form (PRESET=smoke): convert + rank SmolLM2-135M,
tokenize the corpus, train 3 elastic iterations under torchrun, evaluate every budget."""

from __future__ import annotations

import json
import os

import pytest
from helpers import run_example


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One OUT for both tests: the second reuses the converted checkpoint and the data."""
    return tmp_path_factory.mktemp("pretrain_example")


def test_pretrain_flextron_example_runs_end_to_end(run_dir):
    tmp_path = run_dir
    out = run_example("pretrain_flextron.sh", str(tmp_path / "run"), timeout=1200)
    run = tmp_path / "run"
    assert (run / "elastic" / "latest_checkpointed_iteration.txt").read_text() == "3"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert set(metrics[-1]["eval"]) == {"1", "0.75", "0.5", "0.35"}
    assert os.listdir(run / "tensorboard")
    # two evaluation tables (ranked, then trained), one row per budget, real perplexities
    rows = [
        line
        for line in out.stdout.splitlines()
        if line.startswith("| 0.") or line.startswith("| 1 ")
    ]
    assert len(rows) == 8, out.stdout[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| budget"))
    loss_column = [c.strip() for c in header.split("|")].index("loss")
    full_ranked = float(rows[0].split("|")[loss_column])
    assert 1.5 < full_ranked < 5.0  # SmolLM2's own held-out loss, not a random model's ~10.8


def test_every_stage_honours_save_and_train_iters_overrides(run_dir, tmp_path):
    """--save and --train-iters reach training, its schedule (the preset's warmup scales down
    with --train-iters; 2 iterations would be below a fixed one) and the evaluation stage,
    which evaluates the checkpoint in --save (it used to look in OUT/elastic and fail)."""
    save = tmp_path / "mine"
    out = run_example(
        "pretrain_flextron.sh", str(run_dir / "run"), "--save", str(save), "--train-iters", "2",
        timeout=1200,
    )  # fmt: skip
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert f"-- {save}: after elastic training" in out.stdout, out.stdout[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| 0.", "| 1 "))]
    assert len(rows) == 8, out.stdout[-3000:]  # before and after training, every budget
