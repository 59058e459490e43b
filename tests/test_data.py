"""Megatron data pipeline: preprocess -> .bin/.idx -> GPTDataset gives back the tokenizer's ids."""

from __future__ import annotations

import json
import os

import numpy
import pytest

from megatron_flextron.data.corpus import wiki_documents

pytestmark = pytest.mark.usefixtures("megatron_single_process")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE tokenizer.json trained offline on the corpus (seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(wiki_documents("valid")[:200], trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return str(out)


def test_preprocess_then_gpt_dataset_round_trip(tmp_path, tokenizer_dir):
    from megatron_flextron.data.gpt_data import build_gpt_datasets
    from megatron_flextron.data.tokenizer import build_tokenizer
    from tools.preprocess_data import main as preprocess

    docs = wiki_documents("test")[:30]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    assert (
        preprocess(
            [
                "--input",
                str(tmp_path / "docs.jsonl"),
                "--output-prefix",
                str(tmp_path / "wiki"),
                "--tokenizer-type",
                "HuggingFaceTokenizer",
                "--tokenizer-model",
                tokenizer_dir,
                "--append-eod",
            ]
        )
        == 0
    )
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    expected = numpy.concatenate([tok.tokenize(d) + [tok.eod] for d in docs])

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(str(tmp_path / "wiki_text_document"))
    assert len(indexed) == len(docs)
    assert numpy.array_equal(numpy.concatenate([indexed[i] for i in range(len(docs))]), expected)
    assert tok.detokenize(indexed[0][:-1]) == docs[0]

    seq = 32
    train, valid, _ = build_gpt_datasets(
        [str(tmp_path / "wiki_text_document")],
        "90,10,0",
        seq,
        1234,
        tok,
        [8, 2, None],
        cache_dir=str(tmp_path / "cache"),
    )
    sample = train[0]
    tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
    assert tokens.shape == (seq,) and numpy.array_equal(tokens[1:], labels[:-1])
    # every training sample is a window of the token stream of the training documents
    stream = expected.tolist()
    window = tokens.tolist() + [int(labels[-1])]
    assert any(stream[i : i + seq + 1] == window for i in range(len(stream) - seq))
    assert valid is not None and len(train) >= 8


def test_preprocess_bad_input_fails_cleanly(tmp_path, tokenizer_dir):
    from tools.preprocess_data import main as preprocess

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    code = preprocess(
        [
            "--input",
            str(tmp_path / "bad.jsonl"),
            "--output-prefix",
            str(tmp_path / "x"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            tokenizer_dir,
        ]
    )
    assert code == 2
    assert not any(name.startswith("x_") for name in os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        from megatron_flextron.data.gpt_data import build_gpt_datasets
        from megatron_flextron.data.tokenizer import build_tokenizer

        build_gpt_datasets(
            [str(tmp_path / "nope")],
            "100,0,0",
            16,
            1,
            build_tokenizer("HuggingFaceTokenizer", tokenizer_dir),
            [4, None, None],
        )


def test_gpt2_bpe_tokenizer_matches_transformers(tmp_path, tokenizer_dir):
    """GPT2BPETokenizer from vocab.json + merges.txt gives transformers' GPT-2 tokenizer's ids."""
    from tokenizers import Tokenizer
    from transformers import GPT2Tokenizer

    from megatron_flextron.data.tokenizer import build_tokenizer

    Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).model.save(str(tmp_path))
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    reference = GPT2Tokenizer.from_pretrained(str(tmp_path))
    docs = wiki_documents("test")[:20]
    for doc in docs:
        assert ours.tokenize(doc) == reference(doc)["input_ids"]
        assert ours.detokenize(ours.tokenize(doc)) == reference.decode(ours.tokenize(doc))
    assert ours.eod == reference.convert_tokens_to_ids("<|endoftext|>")
    assert build_tokenizer("GPT2BPETokenizer", str(tmp_path)).tokenize(docs[0]) == ours.tokenize(
        docs[0]
    )
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=str(tmp_path / "nope"))


def test_tokenizers_use_megatron_core_tokenizers_without_the_legacy_warning(tokenizer_dir, caplog):
    """Built on megatron.core.tokenizers' base class: no legacy-system deprecation warning."""
    import logging

    from megatron.core.tokenizers.base_tokenizer import MegatronTokenizerBase

    from megatron_flextron.data.tokenizer import build_tokenizer

    with caplog.at_level(logging.WARNING):
        tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    assert isinstance(tok, MegatronTokenizerBase)
    assert "legacy tokenizer" not in caplog.text
    assert tok.unique_identifiers["class"] == "HuggingFaceTokenizer"
    assert tok.detokenize(tok.tokenize("hello world")) == "hello world"
