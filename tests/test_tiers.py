"""Every test has exactly one tier marker (tests/conftest.py), and the tiers follow what a test
does: gloo ranks or torchrun -> multirank, a tool's subprocess -> integration, else unit."""

import os

from conftest import tier_of

HERE = os.path.dirname(os.path.abspath(__file__))


def test_each_collected_test_has_one_tier(request):
    tiers = {"unit", "multirank", "integration"}
    for item in request.session.items:
        marks = {m.name for m in item.iter_markers()} & tiers
        assert len(marks) == 1, (item.nodeid, marks)


def test_tiers_follow_what_a_test_does(tmp_path):
    assert (
        tier_of(os.path.join(HERE, "test_parallel.py"), "test_parallel_equals_single_process")
        == "multirank"
    )
    assert (
        tier_of(
            os.path.join(HERE, "test_bad_input_files.py"),
            "test_torchrun_shows_one_line_for_bad_input",
        )
        == "multirank"
    )
    assert (
        tier_of(
            os.path.join(HERE, "test_bad_input.py"), "test_missing_load_dir_says_it_does_not_exist"
        )
        == "integration"
    )
    assert (
        tier_of(os.path.join(HERE, "test_trainer.py"), "test_token_routers_refuse_fp16")
        == "integration"
    )
    assert (
        tier_of(
            os.path.join(HERE, "test_bad_input.py"), "test_two_writers_of_one_output_do_not_race"
        )
        == "unit"
    )
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "def helper():\n    run_distributed(body, 2)\n\n"
        "def test_a():\n    helper()\n\n"
        "def test_b():\n    subprocess.run(['python', 'tools/generate.py'])\n\n"
        "def test_c():\n    assert 1 + 1 == 2\n"
    )
    tiers = [tier_of(str(planted), name) for name in ("test_a", "test_b", "test_c")]
    assert tiers == ["multirank", "integration", "unit"]
