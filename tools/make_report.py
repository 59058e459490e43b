"""Markdown table, CSV and PNG plot of quality vs budget vs latency from evaluation results.

  python tools/make_report.py --inputs runs/mini/eval/*.json --output-prefix runs/mini/results \\
      --title "SmolLM2-135M: Flextron vs baselines"

Inputs are files written by tools/evaluate.py --output (label each with --label).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402


def _main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", nargs="+", required=True, help="tools/evaluate.py --output files")
    p.add_argument("--output-prefix", required=True, help="PREFIX.md, PREFIX.csv, PREFIX.png")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    from megatron_flextron.evaluation.report import write_report

    out = write_report(args.inputs, args.output_prefix, args.title)
    with open(out["md"]) as f:
        print(f.read(), end="")
    print("wrote " + ", ".join(out.values()))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
