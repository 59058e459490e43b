"""docs/moe.md's worked example runs as written (examples/moe_worked_example.sh): a tiny
Qwen3-MoE from transformers -> flextron -> elastic training under torchrun -> the half sub-network
exported with --saver hf -> transformers generates what tools/generate.py generates
(experts ranked at conversion). Checked here too: the export is the sub-network's shape and
computes the trained elastic model's logits at it."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from helpers import elastic_logits, run_example
from test_convert import TOKENS, hf_logits
from test_hf_moe import close

from megatron_flextron.checkpoint.flextron import read_flextron

pytestmark = pytest.mark.usefixtures("megatron_single_process")

SUB = {"experts": 4, "moe_ffn": 32, "topk": 1}


def test_moe_worked_example_runs_and_its_export_is_the_subnetwork(tmp_path):
    out_dir = tmp_path / "run"
    python = os.environ.get("FLEXTRON_PYTHON", sys.executable)
    out = run_example("moe_worked_example.sh", str(out_dir), timeout=900, FLEXTRON_PYTHON=python)
    assert "transformers on the export continues exactly as the elastic sub-network" in out.stdout
    assert (out_dir / "trained" / "latest_checkpointed_iteration.txt").read_text() == "6"
    config = json.loads((out_dir / "hf_half" / "config.json").read_text())
    shape = {k: config[k] for k in ("model_type", "num_experts", "moe_intermediate_size")}
    assert shape == {"model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 32}
    assert config["num_experts_per_tok"] == 1
    importance = json.loads((out_dir / "flextron" / "flextron_config.json").read_text())
    orders = importance["metadata"]["importance"]["expert_order"]  # ranked at conversion
    assert [sorted(layer) for layer in orders] == [list(range(8))] * 2, orders

    trained, converted = (
        read_flextron(str(out_dir / "trained")),
        read_flextron(str(out_dir / "flextron")),
    )
    router = "decoder.layers.0.mlp.router.weight"
    assert not torch.equal(trained.state[router], converted.state[router])  # training moved it
    close(
        "hf export of the trained sub-network vs the elastic model at it",
        hf_logits(str(out_dir / "hf_half"), TOKENS),
        elastic_logits(trained, TOKENS, SUB),
    )
    close(  # and the source round-trips: the converted model is the transformers one
        "converted flextron vs the transformers source",
        elastic_logits(converted, TOKENS),
        hf_logits(str(out_dir / "qwen3_moe"), TOKENS),
    )
