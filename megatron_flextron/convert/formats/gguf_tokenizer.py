"""A byte-level BPE tokenizer (``tokenizer.json``) written as llama.cpp's GGUF tokenizer metadata.

llama.cpp does not run the tokenizer.json pre-tokenizer: it picks a built-in one by name
(``tokenizer.ggml.pre``). Exact or refuse: only the pre-tokenizers with a llama.cpp equivalent
(GPT-2's byte-level regex, and SmolLM's single digits before it) are written; any other
normalizer, pre-tokenizer or model is refused by name rather than tokenized differently.
"""

from __future__ import annotations

import json
import os

from megatron_flextron.checkpoint.state import CheckpointError

# llama.cpp token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def _matches(node, want: dict) -> bool:
    return isinstance(node, dict) and all(node.get(k, v) == v for k, v in want.items())


def llama_cpp_pre(pre) -> str:
    """The llama.cpp pre-tokenizer that splits text as ``pre`` (tokenizer.json) does."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _matches(steps[0], _BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and _matches(steps[0], _DIGITS) and _matches(steps[1], _BYTE_LEVEL):
        return "smollm"
    raise CheckpointError(
        f"GGUF export: tokenizer pre_tokenizer {json.dumps(pre)} has no llama.cpp equivalent "
        "(byte-level BPE with GPT-2's regex, optionally after single-digit splits)"
    )


def _load(tokenizer_dir) -> dict:
    path = os.path.join(tokenizer_dir or "", "tokenizer.json")
    if not tokenizer_dir or not os.path.isfile(path):
        raise CheckpointError(
            "GGUF export needs the model's tokenizer as tokenizer.json (byte-level BPE); this "
            "checkpoint carries none: pass --tokenizer-model"
        )
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise CheckpointError(
            f"GGUF export: tokenizer model {model.get('type')!r} (byte_fallback="
            f"{model.get('byte_fallback')}) is not byte-level BPE"
        )
    if spec.get("normalizer") is not None:
        raise CheckpointError(
            f"GGUF export: tokenizer normalizer {spec['normalizer'].get('type')!r} has no "
            "llama.cpp equivalent"
        )
    return spec


def tokenizer_pre(tokenizer_dir) -> str:
    """llama.cpp's pre-tokenizer name for the tokenizer in ``tokenizer_dir``, or refuse it."""
    return llama_cpp_pre(_load(tokenizer_dir).get("pre_tokenizer"))


def add_tokenizer(writer, tokenizer_dir, vocab_size: int) -> None:
    """Tokens, types, merges, special ids and chat template of ``tokenizer_dir``; embedding rows
    past the tokenizer's vocabulary (a padded vocabulary) become unused ``[PADi]`` tokens."""
    import gguf
    from tokenizers import Tokenizer

    pre = tokenizer_pre(tokenizer_dir)
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or sorted(vocab.values()) != list(range(len(vocab))):
        raise CheckpointError(
            f"GGUF export: the tokenizer's {len(vocab)} ids are not 0..n-1 within the model's "
            f"{vocab_size} embedding rows"
        )
    added = tok.get_added_tokens_decoder()
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    # what the HF tokenizer adds around a text (its post-processor), not a default of llama.cpp
    bare, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    special.add_special_token["bos"] = len(full) > len(bare) and full[0] != bare[0]
    special.add_special_token["eos"] = len(full) > len(bare) and full[-1] != bare[-1]
    special.add_to_gguf(writer, quiet=True)
