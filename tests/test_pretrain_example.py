"""The README's main command in its reduced form (PRESET=smoke): convert + rank SmolLM2-135M,
tokenize the corpus, train 3 elastic iterations under torchrun, evaluate every budget."""

from __future__ import annotations

import json
import os

from helpers import run_example


def test_pretrain_flextron_example_runs_end_to_end(tmp_path):
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
