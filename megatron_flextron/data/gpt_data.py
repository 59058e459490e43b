"""Megatron's data pipeline: .bin/.idx indexed datasets and GPTDataset through
BlendedMegatronDatasetBuilder (``--data-path`` with optional weights, ``--split``)."""

from __future__ import annotations

import math
import os
import re
from typing import Iterable, List, Optional, Sequence

import numpy
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder


def write_indexed_dataset(
    documents: Iterable[str], tokenizer, output_prefix: str, append_eod: bool = True
) -> dict:
    """Tokenize documents into ``{output_prefix}.bin/.idx`` (one megatron document each).

    Written to temporary names and renamed when complete, so a failed run leaves no dataset.
    """
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_bin, tmp_idx = f"{output_prefix}.bin.tmp", f"{output_prefix}.idx.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    docs = tokens = 0
    try:
        for text in documents:
            ids = tokenizer.tokenize(text)
            if append_eod:
                ids = list(ids) + [tokenizer.eod]
            if not ids:
                continue
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            docs, tokens = docs + 1, tokens + len(ids)
        if not docs:  # megatron's dataset builder would fail on it much later
            raise ValueError(f"no document to write to {output_prefix}: the input is empty")
        builder.finalize(tmp_idx)
        os.replace(tmp_bin, f"{output_prefix}.bin")
        os.replace(tmp_idx, f"{output_prefix}.idx")
    finally:
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return {"documents": docs, "tokens": tokens, "dtype": numpy.dtype(dtype).name}


def check_data_path(data_path: Sequence[str]) -> None:
    """Every prefix of a megatron blend (``PREFIX`` or ``W PREFIX W PREFIX ...``) has .bin/.idx."""
    for prefix in data_path[1::2] if len(data_path) > 1 else data_path:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"--data-path: missing {prefix + ext}")


def check_split(split: str) -> None:
    """megatron's ``--split``: up to three train,valid,test weights (``,`` or ``/``), not all 0.
    megatron itself reads whatever digits it finds, so ``abc`` would divide by zero there."""
    parts = re.split(r"[,/]", split.strip())
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(
            f"--split {split!r}: expected up to three non-negative train,valid,test weights, "
            "e.g. 969,30,1"
        )
    if sum(weights) == 0:
        raise ValueError(f"--split {split!r}: the weights sum to 0")


def build_gpt_datasets(
    data_path: Sequence[str],
    split: str,
    seq_length: int,
    seed: int,
    tokenizer,
    num_samples: Sequence[Optional[int]],
    cache_dir: Optional[str] = None,
) -> List:
    """[train, valid, test] GPTDatasets (None where a split is empty). ``data_path`` is megatron's
    list: ``prefix`` or ``weight prefix weight prefix ...``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    check_data_path(data_path)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=get_blend_from_list(list(data_path)),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache_dir,
    )
    return BlendedMegatronDatasetBuilder(
        GPTDataset, list(num_samples), lambda: True, config
    ).build()


def rank_microbatches(
    dataset,
    first_sample: int,
    num_microbatches: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    device=None,
) -> List[dict]:
    """This rank's micro-batches of one global batch starting at ``first_sample``.

    As megatron's pretraining sampler: each micro step takes the next micro x DP samples and
    rank r gets the r-th block of ``micro_batch_size``. Depends only on the sample index, so a
    resumed run reads exactly the batches the uninterrupted run would have read.
    """
    batches = []
    for m in range(num_microbatches):
        start = first_sample + (m * data_parallel_size + data_parallel_rank) * micro_batch_size
        samples = [dataset[i] for i in range(start, start + micro_batch_size)]
        batches.append(
            {
                key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)
                for key in ("tokens", "labels", "loss_mask", "position_ids")
            }
        )
    return batches
