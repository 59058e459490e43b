"""Tokenizers with megatron's tokenizer interface (tokenize, detokenize, vocab_size, eod, pad).

``--tokenizer-type`` follows Megatron's names: ``HuggingFaceTokenizer`` (a tokenizer.json, read by
the ``tokenizers`` library alone), ``SentencePieceTokenizer`` (a .model file) and
``GPT2BPETokenizer`` (GPT-2's byte-level BPE from ``--vocab-file`` vocab.json and ``--merge-file``
merges.txt, or a folder holding both).

They derive from ``megatron.core.tokenizers``' base class (``MegatronTokenizerBase``), not the
deprecated legacy one (which prints a deprecation warning on every construction), and carry the
``unique_identifiers`` megatron's dataset cache keys on.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import List

from megatron.core.tokenizers.base_tokenizer import MegatronTokenizerBase

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer")
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class _Tokenizer(MegatronTokenizerBase):
    """What megatron's datasets and our tools use: tokenize, detokenize, vocab, eod."""

    def __init__(self, path: str, library: str):
        super().__init__(path, {"library": library, "model_type": "gpt", "chat_template": None})
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [path])]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    @property
    def pad(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} has no padding token")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no chat template")


class HuggingFaceTokenizer(_Tokenizer):
    def __init__(self, path: str, tokenizer=None):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if tokenizer is None and not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        super().__init__(file, "huggingface")
        self._tok = tokenizer or Tokenizer.from_file(file)
        eod = next(
            (
                self._tok.token_to_id(t)
                for t in _EOD_CANDIDATES
                if self._tok.token_to_id(t) is not None
            ),
            None,
        )
        if eod is None:
            raise ValueError(f"{file} has none of the end-of-document tokens {_EOD_CANDIDATES}")
        self._eod = eod

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab(self):
        return self._tok.get_vocab()

    @property
    def inv_vocab(self):
        return {v: k for k, v in self._tok.get_vocab().items()}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eod(self) -> int:
        return self._eod


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2's byte-level BPE (Megatron's GPT2BPETokenizer) from vocab.json + merges.txt."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for what, file in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{what}: no file at {file}")
        tok = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        super().__init__(vocab_file, tokenizer=tok)


class SentencePieceTokenizer(_Tokenizer):
    def __init__(self, path: str):
        import sentencepiece

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        super().__init__(path, "sentencepiece")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self._eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else self._sp.piece_to_id("</s>")

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode(list(ids))

    @property
    def vocab(self):
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self):
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str = None,
    vocab_file: str = None,
    merge_file: str = None,
) -> MegatronTokenizerBase:
    """``vocab_file``/``merge_file`` (GPT2BPETokenizer) default to the files in the
    ``tokenizer_model`` folder."""
    if tokenizer_type == "GPT2BPETokenizer":
        folder = tokenizer_model or ""
        return GPT2BPETokenizer(
            vocab_file or os.path.join(folder, "vocab.json"),
            merge_file or os.path.join(folder, "merges.txt"),
        )
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    raise ValueError(
        f"unknown --tokenizer-type {tokenizer_type!r}; expected one of {TOKENIZER_TYPES}"
    )
