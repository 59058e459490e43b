"""tools/make_report.py: evaluation results -> markdown, CSV and PNG; per-shape pooled latency;
bad input refused before anything is written."""

from __future__ import annotations

import csv
import json

import pytest

from megatron_flextron.evaluation.report import load_rows, write_report

SMALL, FULL = {"mlp": 64, "heads": 4}, {"mlp": 128, "heads": 8}


def _result(budget, subnet, loss, latency, method=None):
    r = {
        "budget": budget,
        "loss": loss,
        "ppl": round(2.718281828**loss, 4),
        "subnetwork": subnet,
        "params": 1_000_000 if subnet is SMALL else 2_000_000,
        "latency_ms": latency,
        "mc": {"cloze": {"acc": 0.5, "acc_norm": 0.5, "examples": 4}},
    }
    return {"method": method, **r} if method else r


def test_report_tables_pool_latency_per_shape_and_plot(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    # budgets listed out of order: rows come back per method, budgets descending
    a.write_text(
        json.dumps([_result(0.5, SMALL, 3.0, 10.0, "A"), _result(1.0, FULL, 2.0, 20.0, "A")])
    )
    b.write_text(
        json.dumps([_result(1.0, FULL, 1.5, 22.0, "B"), _result(0.5, SMALL, 2.5, 14.0, "B")])
    )
    out = write_report([str(a), str(b)], str(tmp_path / "r"), title="t")
    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("A", "1"),
        ("A", "0.5"),
        ("B", "1"),
        ("B", "0.5"),
    ]
    # one shape, one latency: the median of its measurements in every file
    assert [r["latency (ms)"] for r in rows] == ["21.00", "12.00", "21.00", "12.00"]
    assert [r["loss"] for r in rows] == ["2.000", "3.000", "1.500", "2.500"]
    assert rows[0]["cloze acc"] == "0.500" and rows[0]["params (M)"] == "2.0"
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("## t") and "| B | 0.5 |" in md
    assert md.count("\n|") == 6  # header, alignment, 4 rows
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_routed_rows_keep_their_own_latency(tmp_path):
    routed = dict(_result(0.5, FULL, 2.2, 7.0, "routed"), mean_mlp_width_fraction=0.5, params=None)
    (tmp_path / "a.json").write_text(json.dumps([_result(1.0, FULL, 2.0, 10.0, "A"), routed]))
    out = write_report([str(tmp_path / "a.json")], str(tmp_path / "r"))
    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["latency (ms)"] for r in rows] == ["10.00", "7.00"]  # same shape, not pooled
    assert rows[1]["params (M)"] == "" and (tmp_path / "r.png").exists()


def test_bad_results_are_refused_before_anything_is_written(tmp_path):
    from tools.make_report import main

    bad = tmp_path / "bad.json"
    bad.write_text('[{"budget": 1.0}]')
    with pytest.raises(ValueError, match="bad.json: a result without 'loss'"):
        load_rows([str(bad)])
    (tmp_path / "cut.json").write_text('[{"loss": 1')
    assert (
        main(["--inputs", str(tmp_path / "cut.json"), "--output-prefix", str(tmp_path / "r")]) == 2
    )
    missing = str(tmp_path / "missing.json")
    assert main(["--inputs", missing, "--output-prefix", str(tmp_path / "r")]) == 2
    assert not list(tmp_path.glob("r.*"))
