"""Tokenize text into megatron's indexed dataset format (.bin/.idx), as Megatron's tool does.

  python tools/preprocess_data.py --input wiki:train --output-prefix data/wiki_train \\
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model ckpt/smollm2/tokenizer --append-eod

--input: a .jsonl file (the --json-keys field of each line is a document), a text file (documents
separated by blank lines), or wiki:train / wiki:valid / wiki:test (the bundled corpus).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import ArgumentParser, run_main  # noqa: E402
from megatron_flextron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def _main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_text_document.bin/.idx")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument(
        "--tokenizer-model",
        help="tokenizer.json (or its folder) / sentencepiece .model / folder with vocab.json and "
        "merges.txt",
    )
    p.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    p.add_argument("--append-eod", action="store_true", help="end every document with EOD")
    args = p.parse_args(argv)
    from megatron_flextron.data.corpus import iter_documents
    from megatron_flextron.data.gpt_data import write_indexed_dataset

    if not (args.tokenizer_model or args.vocab_file):
        p.error("--tokenizer-model (or --vocab-file/--merge-file) is required")
    tokenizer = build_tokenizer(
        args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file
    )
    for key in args.json_keys:
        prefix = f"{args.output_prefix}_{key}_document"
        stats = write_indexed_dataset(
            iter_documents(args.input, key), tokenizer, prefix, args.append_eod
        )
        print(json.dumps({"output": prefix, **stats}))
    return 0


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
