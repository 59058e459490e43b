"""Tables and a plot of quality vs budget vs measured latency, from tools/evaluate.py results.

Each input file holds evaluate's results (one per sub-network), labelled with --label. The report
has one row per (method, sub-network): parameters, measured forward latency, held-out loss and
perplexity, and the accuracy on every multiple-choice task; as markdown, CSV and a PNG with
perplexity and mean accuracy against latency (parameters where no latency was measured).

Latency depends on the shape, not on the method: each sub-network's latency is the median of all
its measurements in the inputs (every method that evaluated it timed it once), which keeps one
shape at one x position and damps the noise of single timings.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from typing import Dict, List, Sequence

from megatron_flextron.checkpoint.io import write_text_atomic


def load_rows(paths: Sequence[str]) -> List[dict]:
    """Flat rows, in file order, each with the method label and its MC accuracies."""
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read evaluation results {path}: {e}") from None
        if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
            raise ValueError(f"{path} is not a list of tools/evaluate.py results")
        for r in results:
            if "loss" not in r:
                raise ValueError(f"{path}: a result without 'loss'")
            rows.append(
                {
                    "method": r.get("method", os.path.splitext(os.path.basename(path))[0]),
                    "budget": r.get("budget"),
                    "subnetwork": json.dumps(r.get("subnetwork", {}), sort_keys=True),
                    "chosen_by": r.get("chosen_by", ""),
                    "params": r.get("params"),
                    "latency_ms": r.get("latency_ms"),
                    "loss": r["loss"],
                    "ppl": r["ppl"],
                    "mc": {k: v["acc"] for k, v in r.get("mc", {}).items()},
                    # token-routed rows (--router token): the full shape, a mean routed width
                    "routed_width": r.get("mean_mlp_width_fraction"),
                }
            )
    _pool_latency(rows)
    order = list(dict.fromkeys(r["method"] for r in rows))
    rows.sort(key=lambda r: (order.index(r["method"]), -(r["budget"] or 0)))
    return rows


def _pool_latency(rows: List[dict]) -> None:
    """Fixed shapes share one latency; token-routed rows keep their own timing."""
    by_shape: Dict[str, List[float]] = {}
    fixed = [r for r in rows if r["routed_width"] is None and r["latency_ms"] is not None]
    for r in fixed:
        by_shape.setdefault(r["subnetwork"], []).append(r["latency_ms"])
    for r in fixed:
        r["latency_ms"] = statistics.median(by_shape[r["subnetwork"]])


def _tasks(rows: Sequence[dict]) -> List[str]:
    return sorted({t for r in rows for t in r["mc"]})


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table_rows(rows: Sequence[dict]) -> List[Dict[str, str]]:
    """The report's columns as strings (shared by markdown and CSV)."""
    out = []
    for r in rows:
        row = {
            "method": r["method"],
            "budget": _fmt(r["budget"], "g"),
            "sub-network": r["subnetwork"],
            "params (M)": _fmt(r["params"] and r["params"] / 1e6, ".1f"),
            "latency (ms)": _fmt(r["latency_ms"], ".2f"),
            "loss": f"{r['loss']:.3f}",
            "perplexity": f"{r['ppl']:.2f}",
        }
        for task in _tasks(rows):
            row[f"{task} acc"] = _fmt(r["mc"].get(task), ".3f")
        out.append(row)
    return out


def markdown(rows: Sequence[dict]) -> str:
    table = table_rows(rows)
    header = list(table[0])
    lines = ["| " + " | ".join(header) + " |"]
    align = ["---" if h in ("method", "sub-network") else "---:" for h in header]
    lines.append("| " + " | ".join(align) + " |")
    for row in table:
        cells = [f"`{v}`" if k == "sub-network" else v for k, v in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(rows: Sequence[dict]) -> str:
    table = table_rows(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """Perplexity and mean multiple-choice accuracy against latency, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_latency = all(r["latency_ms"] is not None for r in rows)
    x_key = "latency_ms" if use_latency else "params"
    x_label = "measured latency (ms)" if use_latency else "parameters"
    tasks = _tasks(rows)
    fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(11 if tasks else 6, 4.2), squeeze=False)
    for method in dict.fromkeys(r["method"] for r in rows):
        # lines follow the budgets (shapes of nearly equal latency must not zigzag)
        points = [r for r in rows if r["method"] == method and r[x_key] is not None]
        xs = [p[x_key] for p in points]
        axes[0][0].plot(xs, [p["ppl"] for p in points], "o-", label=method)
        for p in points:
            if p["budget"] is not None:
                axes[0][0].annotate(f"{p['budget']:g}", (p[x_key], p["ppl"]), fontsize=7)
        if tasks:
            accs = [sum(p["mc"].get(t, math.nan) for t in tasks) / len(tasks) for p in points]
            axes[0][1].plot(xs, accs, "o-", label=method)
    axes[0][0].set(xlabel=x_label, ylabel="held-out perplexity", yscale="log")
    axes[0][0].legend(fontsize=8)
    if tasks:
        axes[0][1].set(xlabel=x_label, ylabel=f"mean accuracy ({', '.join(tasks)})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(paths: Sequence[str], prefix: str, title: str = "") -> Dict[str, str]:
    """prefix.md, prefix.csv and prefix.png; returns their paths."""
    rows = load_rows(paths)
    if not rows:
        raise ValueError("no evaluation results to report")
    out = {"md": prefix + ".md", "csv": prefix + ".csv", "png": prefix + ".png"}
    text, table = (f"## {title}\n\n" if title else "") + markdown(rows) + "\n", to_csv(rows)
    plot(rows, out["png"], title)  # the step that can fail on odd input: before the tables
    write_text_atomic(out["md"], text)
    write_text_atomic(out["csv"], table)
    return out
