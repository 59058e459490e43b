"""Write Wikipedia lead sections from the bundled offline corpus as a plain text file.

  python benchmarks/wiki_leads.py --out leads400.txt            # 400 leads of the train split
  python benchmarks/wiki_leads.py --out leads400-lines.txt --one-per-line

The file a new user would pass as ``--calibration-data``: one lead per document, documents
separated by a blank line (the text format of ``data/corpus.py``). Leads are taken in the
corpus's fixed split order, so the file is the same on every machine; ``--split test`` gives
leads that no train-split file shares (the held-out setting of docs/ranking.md).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def leads(split: str, count: int) -> list:
    """The first ``count`` leads of a split, paragraph breaks kept as single newlines (a blank
    line would split a lead into two documents)."""
    from megatron_flextron.data.corpus import wiki_documents

    docs = wiki_documents(split)
    if count > len(docs):
        raise ValueError(f"the {split} split holds {len(docs)} leads, asked for {count}")
    return [" ".join(d.split("\n\n")).strip() for d in docs[:count]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument(
        "--one-per-line",
        action="store_true",
        help="one lead per line, no blank lines: the converter then reads the whole file as one "
        "document (no end-of-document token between leads)",
    )
    args = p.parse_args(argv)
    try:
        text = ("\n" if args.one_per_line else "\n\n").join(leads(args.split, args.count)) + "\n"
    except (ValueError, RuntimeError) as e:
        print(f"wiki_leads: {e}", file=sys.stderr)
        return 2
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)  # atomic: never a half-written file at --out
    return 0


if __name__ == "__main__":
    sys.exit(main())
