"""The tokenizer a Megatron-LM run names in its args, staged as tokenizer files for the outputs.

Megatron-LM records ``tokenizer_type`` with ``tokenizer_model`` (a Hugging Face folder or a
sentencepiece .model) or ``vocab_file``/``merge_file`` (GPT-2 BPE). When those files exist here
they are carried into the converted checkpoint; otherwise the conversion says so and
``--tokenizer-model`` names them instead.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

from megatron_flextron.checkpoint.io import TOKENIZER_FILES, staged_dir
from megatron_flextron.checkpoint.state import CheckpointError

_SENTENCEPIECE = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


def _staged(files: dict) -> str:
    """A temporary folder holding ``{name in the folder: source file}``."""
    out = staged_dir("tokenizer")
    for name, src in files.items():
        shutil.copy2(src, os.path.join(out, name))
    return out


def _has_files(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def stage_tokenizer(path: str) -> str:
    """A folder of tokenizer files from a folder, a tokenizer.json or a sentencepiece .model."""
    if os.path.isdir(path):
        if not _has_files(path):
            raise CheckpointError(f"tokenizer folder {path} holds none of {TOKENIZER_FILES}")
        return path
    if os.path.isfile(path) and path.endswith(".json"):
        return _staged({"tokenizer.json": path})
    if os.path.isfile(path) and path.endswith(".model"):
        return _staged({"tokenizer.model": path})
    raise CheckpointError(
        f"--tokenizer-model {path}: expected a tokenizer folder, a tokenizer.json or a .model"
    )


def vocab_size(folder: str) -> Optional[int]:
    """The tokenizer's own vocabulary size (without Megatron's padding), None if unknown."""
    try:
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            from tokenizers import Tokenizer

            return Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).get_vocab_size()
        if os.path.isfile(os.path.join(folder, "tokenizer.model")):
            import sentencepiece

            model = os.path.join(folder, "tokenizer.model")
            return sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size()
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            with open(os.path.join(folder, "vocab.json")) as f:
                return len(json.load(f))
    except Exception as e:
        raise CheckpointError(f"cannot read the tokenizer in {folder}: {e}") from None
    return None


def _from_args(args) -> Tuple[Optional[str], str]:
    """(folder, note) for the tokenizer the args name; folder None when it is not usable here."""
    kind = getattr(args, "tokenizer_type", None)
    model = getattr(args, "tokenizer_model", None)
    if kind == "HuggingFaceTokenizer" and model and _has_files(model):
        return model, f"HuggingFaceTokenizer from {model}"
    if kind in _SENTENCEPIECE and model and os.path.isfile(model):
        return _staged({"tokenizer.model": model}), f"{kind} from {model}"
    if kind == "GPT2BPETokenizer":
        vocab, merges = getattr(args, "vocab_file", None), getattr(args, "merge_file", None)
        if vocab and merges and os.path.isfile(vocab) and os.path.isfile(merges):
            return _staged({"vocab.json": vocab, "merges.txt": merges}), f"GPT-2 BPE from {vocab}"
        return None, f"GPT2BPETokenizer files {vocab!r}, {merges!r} not found here"
    return None, f"tokenizer_type={kind!r}, tokenizer_model={model!r} is not usable here"


def resolve_tokenizer(
    args, override: Optional[str] = None, beside: Optional[str] = None
) -> Tuple[Optional[str], dict]:
    """The tokenizer folder to carry and what was done, for the metadata: ``--tokenizer-model``
    wins, then the args' tokenizer, then ``beside`` (the checkpoint's own tokenizer/ folder, as
    the megatron saver writes it); the note says how to supply one when none is carried."""
    if override:
        folder, note = stage_tokenizer(override), f"--tokenizer-model {override}"
    else:
        folder, note = _from_args(args)
        if folder is None and beside and _has_files(beside):
            folder, note = stage_tokenizer(beside), f"the checkpoint's {beside}"
    info = {"type": getattr(args, "tokenizer_type", None), "carried": folder is not None}
    if folder is None:
        info["note"] = f"not carried: {note}; pass --tokenizer-model to carry one"
    else:
        info.update(note=note, vocab_size=vocab_size(folder))
    return folder, info
