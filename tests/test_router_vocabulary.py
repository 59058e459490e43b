"""One router vocabulary: training and the tools both say ``--router none | joint | token``; the
tools' earlier words still parse, with a note (static = the default, dynamic = token)."""

import importlib

import pytest

from megatron_flextron.routers.checkpoint import ROUTER_KINDS

BASE = {
    "evaluate": ["--load", "x", "--wiki-split", "test"],
    "generate": ["--load", "x", "--prompt", "hi"],
}


@pytest.mark.parametrize("tool", sorted(BASE))
def test_tools_take_the_training_words_and_the_old_ones_with_a_note(tool, capsys):
    parse_args = importlib.import_module(f"tools.{tool}").parse_args
    assert parse_args(BASE[tool]).router is None  # the checkpoint's router, else nearest
    for kind in ROUTER_KINDS:
        assert parse_args(BASE[tool] + ["--router", kind]).router == kind
    assert capsys.readouterr().err == ""
    assert parse_args(BASE[tool] + ["--router", "dynamic"]).router == "token"
    assert "--router dynamic is deprecated; it means --router token" in capsys.readouterr().err
    assert parse_args(BASE[tool] + ["--router", "static"]).router is None
    assert "--router static is deprecated; it means no --router" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE[tool] + ["--router", "sometimes"])
    assert exit_info.value.code == 2
    assert "unknown router 'sometimes'; expected one of none, joint, token" in (
        capsys.readouterr().err
    )


def test_training_uses_the_same_words():
    from megatron_flextron.training.arguments import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "router")
    assert tuple(action.choices) == ROUTER_KINDS == ("none", "joint", "token")


def test_evaluation_and_serving_never_branch_on_a_router_kind():
    """perplexity.py and subnetworks.py ask the budget policy; only routers/ compares kinds."""
    import ast
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    words = set(ROUTER_KINDS) | {"static", "dynamic"}
    for rel in ("evaluation/perplexity.py", "inference/subnetworks.py"):
        tree = ast.parse(open(os.path.join(root, "megatron_flextron", rel)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                values = [node.left, *node.comparators]
                kinds = [v.value for v in values if isinstance(v, ast.Constant)]
                assert not set(kinds) & words, (rel, node.lineno, kinds)
