"""Build zero-shot multiple-choice tasks from the held-out Wikipedia split (no downloads).

  python tools/make_mc_tasks.py --kind cloze --count 200 --output data/wiki_cloze.jsonl
  python tools/make_mc_tasks.py --kind continuation --count 200 --output data/wiki_next.jsonl

Writes {"context", "choices", "answer"} lines (the format tools/evaluate.py --mc-tasks reads).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, check_output, run_main  # noqa: E402


def _main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=["cloze", "continuation"], required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    check_output(args.output, "--output", folder=False)
    from megatron_flextron.checkpoint.io import write_text_atomic
    from megatron_flextron.data.corpus import wiki_documents
    from megatron_flextron.evaluation.multiple_choice import make_tasks

    tasks = make_tasks(wiki_documents(args.split), args.kind, args.count, args.choices, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_text_atomic(args.output, "".join(json.dumps(t) + "\n" for t in tasks))
    print(json.dumps({"output": args.output, "kind": args.kind, "examples": len(tasks)}))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
