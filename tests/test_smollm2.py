"""The real pretrained model: SmolLM2-135M from its GGUF file, with transformers as the reference,
and importance ranking on real text (cut-down copies keep CPU time low)."""

from __future__ import annotations

import os

import pytest
import torch
from distributed import run_distributed
from test_convert import _tp2_body, megatron_logits

from megatron_flextron.checkpoint.flextron import read_flextron, save_flextron
from megatron_flextron.convert.export import export_subnetwork
from megatron_flextron.convert.formats.gguf import bundled_smollm2, load_gguf
from megatron_flextron.elastic import Subnetwork

pytestmark = pytest.mark.usefixtures("megatron_single_process")
import transformers  # noqa: E402  (a missing dependency fails, it is not skipped)

GGUF = bundled_smollm2()
TEXT = "The capital of France is Paris. The Eiffel Tower was built in 1889 for the World's Fair."


@pytest.fixture(scope="module")
def smol():
    return load_gguf(GGUF)


@pytest.fixture(scope="module")
def smol6(smol):
    """The first 6 of its 30 layers (full widths): a real-weight model that runs fast on CPU."""
    ckpt = export_subnetwork(smol, Subnetwork.parse({"layers": list(range(6))}, smol.model))
    from megatron_flextron.config import ElasticConfig

    ckpt.elastic = ElasticConfig.from_ratios(ckpt.model, head_ratios=(1.0, 2 / 3, 1 / 3))
    return ckpt


def _ids(tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok, tok(TEXT, return_tensors="pt").input_ids


def test_gguf_loader_matches_transformers_gguf(smol, tmp_path):
    tok, ids = _ids(smol.tokenizer_dir)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF), dtype=torch.float32
    )
    with torch.no_grad():
        ref = ref_model.eval()(ids).logits
    ours = megatron_logits(smol, ids)
    assert (ours - ref).abs().max() <= 1e-4
    # the whole model exported to transformers gives the same logits
    from test_convert import hf_logits

    from megatron_flextron.convert.formats.hf import save_hf

    out = tmp_path / "hf"
    os.makedirs(out)
    save_hf(smol, str(out))
    assert (hf_logits(str(out), ids) - ref).abs().max() <= 1e-4
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    assert tok.decode(megatron_logits(smol, prompt)[0, -1].argmax()) == " Paris"


def test_conversion_at_tp3_exports_the_same_models_as_tp1(smol6, tmp_path):
    for tp in (1, 3):
        os.makedirs(tmp_path / f"tp{tp}")
        save_flextron(smol6, str(tmp_path / f"tp{tp}"), tensor_parallel_size=tp)
    a, b = read_flextron(str(tmp_path / "tp1")), read_flextron(str(tmp_path / "tp3"))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    for spec in ({"mlp": 768, "heads": 6}, {"mlp": 384, "heads": 3}):
        sub = Subnetwork.parse(spec, a.model)
        ea, eb = export_subnetwork(a, sub), export_subnetwork(b, sub)
        assert all(torch.equal(ea.state[k], eb.state[k]) for k in ea.state)


def test_importance_ranking_on_real_text(smol, tmp_path):
    """On the whole model (a cut-down copy is not a language model: its loss is ~17)."""
    from megatron_flextron.config import ElasticConfig
    from megatron_flextron.importance import rank_and_permute

    smol.elastic = ElasticConfig.from_ratios(smol.model, head_ratios=(1.0, 2 / 3, 1 / 3))
    ranked = rank_and_permute(
        smol, "wiki", samples=16, seq_length=128, head_estimator="auto", mode="thorough"
    )
    info = ranked.metadata["importance"]
    mlp = info["mlp_selection"]["loss"]
    # at 50% MLP width, importance order is clearly better than the source order
    assert mlp["activation"] < mlp["original"] - 2.0, mlp
    candidates = {"original", "activation", "taylor", "taylor_token"}
    assert set(info["head_selection"]["loss"]) == candidates
    # the permutation is function-preserving at full size
    _, ids = _ids(smol.tokenizer_dir)
    diff = (megatron_logits(ranked, ids) - megatron_logits(smol, ids)).abs().max()
    assert diff <= 1e-4, diff
    # ...and a TP=3 load of the ranked checkpoint (re-dealt on 3 gloo ranks): the same functions
    os.makedirs(tmp_path / "ranked")
    save_flextron(ranked, str(tmp_path / "ranked"), tensor_parallel_size=1)
    spec = {"mlp": 768, "heads": 6}
    ids = ids[:, :12].expand(2, 12).contiguous()
    run_distributed(
        _tp2_body,
        3,
        str(tmp_path / "ranked"),
        ids,
        megatron_logits(smol, ids),
        megatron_logits(ranked, ids, spec),
        spec,
        3e-4,
    )  # 30 layers, |logits| ~ 30


def _evaluate(args, nproc=1):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    launcher = (
        [sys.executable]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
        ]
    )
    out = subprocess.run(
        launcher + [os.path.join(root, "tools", "evaluate.py"), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_evaluate_tool_tp1_equals_tp3(smol6, tmp_path):
    os.makedirs(tmp_path / "smol")
    save_flextron(smol6, str(tmp_path / "smol"), tensor_parallel_size=3)
    common = [
        "--load",
        str(tmp_path / "smol"),
        "--wiki-split",
        "test",
        "--seq-length",
        "64",
        "--max-sequences",
        "4",
        "--micro-batch-size",
        "2",
    ]
    full = _evaluate(common)
    half = _evaluate(common + ["--subnetwork", '{"mlp": 768, "heads": 6}'])
    tp3 = _evaluate(
        common + ["--subnetwork", '{"mlp": 768, "heads": 6}', "--tensor-model-parallel-size", "3"],
        nproc=3,
    )
    assert full["tokens"] == 4 * 64 and full["loss"] < half["loss"]
    assert abs(tp3["loss"] - half["loss"]) <= 1e-5, (tp3, half)
    assert half["params"] < full["params"]
