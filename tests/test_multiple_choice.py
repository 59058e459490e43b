"""Multiple-choice evaluation: generated tasks are well formed; scores are the model's own
log-likelihoods of each choice given the context."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_flextron.data.corpus import wiki_documents
from megatron_flextron.evaluation.multiple_choice import make_tasks, read_tasks, score

pytestmark = pytest.mark.usefixtures("megatron_single_process")


@pytest.mark.parametrize("kind", ["cloze", "continuation"])
def test_generated_tasks_are_well_formed_and_deterministic(kind):
    docs = wiki_documents("test")
    tasks = make_tasks(docs, kind, 50, seed=3)
    assert len(tasks) == 50 and tasks == make_tasks(docs, kind, 50, seed=3)
    for t in tasks:
        assert len(t["choices"]) == 4 and len(set(t["choices"])) == 4
        assert t["choices"][t["answer"]].startswith(" ")
    assert len({t["answer"] for t in tasks}) > 1  # the answer is not always in one place


def test_scores_are_the_models_log_likelihoods(tmp_path):
    from helpers import evaluate_rows, write_training_setup

    from megatron_flextron.checkpoint.load import load_elastic_model
    from megatron_flextron.data.corpus import load_tokenizer

    setup = write_training_setup(str(tmp_path), docs=100)
    ckpt = setup["load"]
    gpt = load_elastic_model(ckpt).model
    tok = load_tokenizer(f"{ckpt}/tokenizer")
    tasks = make_tasks(wiki_documents("test"), "cloze", 6)
    path = tmp_path / "cloze.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    result = score(gpt, tok, read_tasks(str(path)))
    k = 0
    with torch.no_grad():
        for t in tasks:
            context = tok.encode(t["context"]).ids
            for choice in t["choices"]:
                ids = torch.tensor([tok.encode(t["context"] + choice).ids])
                logp = gpt(ids, torch.arange(ids.size(1))[None], None).log_softmax(-1)
                start = len(context)
                want = sum(float(logp[0, j - 1, ids[0, j]]) for j in range(start, ids.size(1)))
                assert result["loglik"][k] == pytest.approx(want, abs=1e-4)
                k += 1
    assert result["examples"] == 6 and 0 <= result["acc"] <= 1
    flags = dict(data="wiki:test", seq_length=32, max_sequences=4)
    row = evaluate_rows(ckpt, **flags, mc_tasks=[str(path)], measure_latency=True)[0]
    assert row["mc"]["cloze"] == {
        "acc": round(result["acc"], 4),
        "acc_norm": round(result["acc_norm"], 4),
        "examples": 6,
    }
    assert row["latency_ms"] > 0
    (tmp_path / "bad.jsonl").write_text('{"context": "x", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_tasks(str(tmp_path / "bad.jsonl"))
