"""Zero-shot multiple-choice accuracy by log-likelihood, on local JSON-lines tasks.

Task format, one example per line:  {"context": str, "choices": [str, ...], "answer": int}
Each choice is scored by the model's log-likelihood of its tokens after the context (the choice
text is appended to the context as is, so it usually starts with a space). ``acc`` takes the
highest total log-likelihood, ``acc_norm`` the highest per character of the choice (as
lm-evaluation-harness does).

Generators build tasks from the held-out Wikipedia split, nothing downloaded:
- ``cloze``: a sentence without its last word; choices: that word and words ending other
  sentences;
- ``continuation``: an article's first sentence; choices: its second sentence and second
  sentences of other articles.
"""

from __future__ import annotations

import json
import random
import re
from typing import List, Sequence

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> List[str]:
    return [s.strip() for s in _SENTENCE.split(text) if len(s.strip().split()) >= 6]


def make_tasks(documents: Sequence[str], kind: str, count: int, choices: int = 4, seed: int = 0):
    """Up to ``count`` examples of ``kind`` ('cloze' or 'continuation')."""
    if kind not in ("cloze", "continuation"):
        raise ValueError(f"unknown task kind {kind!r}; expected cloze or continuation")
    rng = random.Random(seed)
    pairs = []
    for doc in documents:
        sents = _sentences(doc)
        if kind == "cloze" and sents:
            words = sents[0].rstrip(".!?").split()
            if words[-1].isalpha():
                pairs.append((" ".join(words[:-1]), " " + words[-1]))
        elif kind == "continuation" and len(sents) >= 2:
            pairs.append((sents[0], " " + sents[1]))
    examples = []
    for i, (context, answer) in enumerate(pairs[:count]):
        pool = [a for j, (_, a) in enumerate(pairs) if j != i and a != answer]
        options = rng.sample(pool, min(choices - 1, len(pool))) + [answer]
        rng.shuffle(options)
        examples.append({"context": context, "choices": options, "answer": options.index(answer)})
    return examples


def read_tasks(path: str) -> List[dict]:
    examples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ok = (
                    isinstance(ex["context"], str)
                    and len(ex["choices"]) >= 2
                    and 0 <= ex["answer"] < len(ex["choices"])
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise ValueError(f"{path}:{n}: not a {{context, choices, answer}} example")
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path} has no example")
    return examples


def score(model, tokenizer, examples: Sequence[dict], micro_batch_size: int = 8, device=None):
    """{"acc", "acc_norm", "examples", "loglik" (per choice, in order)}: one forward pass over
    every (context, choice) pair, under any TP/PP (megatron's schedule)."""
    from megatron_flextron.lm_step import forward_backward, pad_microbatches

    seqs, spans = [], []
    for ex in examples:
        context = tokenizer.encode(ex["context"]).ids
        for choice in ex["choices"]:
            full = tokenizer.encode(ex["context"] + choice).ids
            start = min(len(context), len(full) - 1)  # choice tokens: after the context's
            seqs.append(full)
            spans.append(start)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths batch together
    loglik = [0.0] * len(seqs)
    for i in range(0, len(order), micro_batch_size):
        chunk = order[i : i + micro_batch_size]
        batches = pad_microbatches([seqs[j] for j in chunk], micro_batch_size, device)
        for row, j in enumerate(chunk):
            # labels shift: the choice is predicted from position start - 1 on
            batches[0]["loss_mask"][row, : max(spans[j] - 1, 0)] = 0
        out = forward_backward(model, batches, forward_only=True, per_sequence=True)
        for row, j in enumerate(chunk):
            loglik[j] = -out["nll_per_sequence"][row]
    result = {"loglik": loglik}
    correct = correct_norm = 0
    k = 0
    for ex in examples:
        n = len(ex["choices"])
        ll = loglik[k : k + n]
        norm = [v / max(len(c), 1) for v, c in zip(ll, ex["choices"])]
        correct += int(max(range(n), key=ll.__getitem__) == ex["answer"])
        correct_norm += int(max(range(n), key=norm.__getitem__) == ex["answer"])
        k += n
    result.update(
        acc=correct / len(examples), acc_norm=correct_norm / len(examples), examples=len(examples)
    )
    return result
