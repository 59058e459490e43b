"""The mini reproduction (examples/reproduce_flextron_mini.sh) in its CI form (PRESET=smoke: a
4-layer cut of SmolLM2-135M, a few steps): every method is trained and evaluated, and the
report's table, CSV and plot agree with the evaluation results."""

from __future__ import annotations

import csv
import json

from helpers import run_example

SHAPES = ["1", "0.75", "0.5", "0.35"]


def test_reproduction_runs_every_method_and_reports_them(tmp_path):
    run = tmp_path / "mini"
    run_example("reproduce_flextron_mini.sh", str(run))
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    assert [r["budget"] for r in by_method["prune-only"]] == SHAPES
    assert [r["budget"] for r in by_method["prune+finetune"]] == SHAPES
    assert [r["budget"] for r in by_method["flextron"]] == SHAPES
    assert [r["budget"] for r in by_method["flextron+router"]] == ["1", "0.85", "0.7", "0.6"]
    # same shape, same sub-network, whatever the method
    for method in ("prune+finetune", "flextron"):
        for a, b in zip(by_method["prune-only"], by_method[method]):
            assert a["sub-network"] == b["sub-network"] and a["params (M)"] == b["params (M)"]
    # the CSV carries the evaluation files' numbers
    flextron = json.loads((run / "eval" / "flextron.json").read_text())
    for want, got in zip(flextron, by_method["flextron"]):
        assert got["loss"] == f"{want['loss']:.3f}"
        assert got["cloze acc"] == f"{want['mc']['cloze']['acc']:.3f}"
        assert want["mc"]["continuation"]["examples"] == 12 and want["latency_ms"] > 0
    # training helped: the trained sub-networks beat pruning alone at every smaller shape
    for a, b in zip(by_method["prune-only"][1:], by_method["flextron"][1:]):
        assert float(b["loss"]) < float(a["loss"]), (a, b)
    assert (run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| prune+finetune | 0.5 |" in (run / "results.md").read_text()
    # baseline B trained each shape alone: one budget, never the full model
    metrics = [json.loads(x) for x in (run / "logs" / "finetune_0.5.metrics.jsonl").open()]
    assert {b for m in metrics for b in m.get("budgets", {})} == {"0.5"}
