"""megatron-core 0.19 keeps a checkpoint's common state (Megatron-LM's args) inside the torch_dist
shards and unpickles it with weights_only=False; the project reads it first, weights only and
allow-listed, so a crafted checkpoint runs nothing (checkpoint/common_state.py)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from megatron_flextron.checkpoint.common_state import read_common_state
from megatron_flextron.checkpoint.flextron import load_common
from megatron_flextron.checkpoint.state import CheckpointError

pytestmark = pytest.mark.usefixtures("megatron_single_process")


class Evil:
    """Unpickling this runs os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save(folder, common: dict) -> str:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    os.makedirs(folder)
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0)), **common}
    dist_checkpointing.save(state, str(folder))
    return str(folder)


def test_common_state_in_the_shards_reads_like_common_pt(tmp_path):
    args = argparse.Namespace(num_layers=2, hidden_size=8)
    folder = _save(tmp_path / "ckpt", {"args": args, "iteration": 7})
    assert not os.path.exists(os.path.join(folder, "common.pt"))  # megatron-core 0.19 layout
    common = read_common_state(folder)
    assert common["iteration"] == 7 and vars(common["args"]) == vars(args)
    torch.save({"iteration": 3}, os.path.join(folder, "common.pt"))  # a pre-0.19 file wins
    assert read_common_state(folder) == {"iteration": 3}


def test_crafted_common_state_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    folder = _save(tmp_path / "ckpt", {"args": Evil(str(marker))})
    assert not marker.exists()
    for read in (read_common_state, load_common):
        with pytest.raises(CheckpointError, match="outside the allow-list.*system"):
            read(folder)
    assert not marker.exists(), "unpickling the common state ran code"
