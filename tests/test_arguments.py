"""Training flags: Megatron's names, a frozen set, and clear refusals of inconsistent settings."""

from __future__ import annotations

import pytest

from megatron_flextron.training.arguments import build_parser, parse_args

FLAGS = {
    "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size",
    "--expert-model-parallel-size",
    "--expert-placement",
    "--sequence-parallel",
    "--budget-type",
    "--moe-aux-loss-coeff",
    "--moe-router-load-balancing-type",
    "--data-path",
    "--split",
    "--seq-length",
    "--micro-batch-size",
    "--global-batch-size",
    "--tokenizer-type",
    "--tokenizer-model",
    "--lr",
    "--min-lr",
    "--lr-warmup-iters",
    "--lr-decay-style",
    "--weight-decay",
    "--clip-grad",
    "--use-distributed-optimizer",
    "--train-iters",
    "--seed",
    "--bf16",
    "--fp16",
    "--load",
    "--save",
    "--save-interval",
    "--eval-interval",
    "--eval-iters",
    "--log-interval",
    "--tensorboard-dir",
    "--budget-list",
    "--budget-probs",
    "--mlp-choices",
    "--head-choices",
    "--original-model-sample-prob",
    "--heterogeneous",
    "--distill",
    "--kd-temperature",
    "--kd-weight",
    "--lr-decay-iters",
    "--no-load-optim",
    "--finetune",
    "--metrics-file",
    "--exit-interval",
    "--exit-signal-handler",
    "--no-exit-signal-handler",
    "--vocab-file",
    "--merge-file",
    "--router",
    "--router-lr",
    "--router-cost-metric",
    "--latency-table",
    "--router-budget-weight",
    "--budget-tolerance",
    "--router-layer-skipping",
}


def test_flag_set_is_frozen_and_documented():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {
        "--help"
    }
    assert flags == FLAGS
    assert all(a.help for a in parser._actions)


@pytest.fixture
def data(tmp_path):
    """--data-path and --load of empty stand-ins (parsing only checks that they exist)."""
    for ext in (".bin", ".idx"):
        (tmp_path / f"wiki{ext}").write_bytes(b"")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "flextron_config.json").write_text("{}")
    return [str(tmp_path / "wiki"), "--load", str(tmp_path / "ckpt")]


def test_megatron_flags_map_onto_dataclasses(data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = parse_args(
        [
            "--data-path",
            *data,
            "--tensor-model-parallel-size",
            "2",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
            "--lr",
            "1e-4",
            "--budget-list",
            "1.0",
            "0.5",
            "--budget-probs",
            "0.25",
            "0.75",
            "--bf16",
        ]
    )
    assert args.parallel.tensor_model_parallel_size == 2 and args.data_parallel_size == 2
    assert args.num_microbatches == 2 and args.optimizer.lr == 1e-4 and args.run.bf16
    assert args.elastic.budget_list == [1.0, 0.5] and args.elastic.distill == "inplace"


# refused settings and (part of) their message; scripts/make_error_table.py lists them
REFUSED_FLAGS = [
    (
        ["--global-batch-size", "6", "--micro-batch-size", "4"],
        "not divisible by --micro-batch-size",
    ),
    (["--bf16", "--fp16"], "mutually exclusive"),
    (["--budget-list", "0.5", "1.0"], "sorted descending"),
    (["--budget-list", "1.0", "0"], "must lie in"),
    (["--min-lr", "1", "--lr", "0.1"], "above --lr"),
    (["--save-interval", "5"], "needs --save"),
    (["--load", "/nonexistent"], "is not a flextron checkpoint"),
    (["--mlp-choices", "1.0", "1.5"], "must lie in (0, 1]"),
    (["--budget-probs", "0.5", "0.5"], "2 values for 4 budgets"),
    (["--kd-temperature", "0"], "--kd-temperature 0.0 must be > 0"),
    (["--kd-temperature", "-1"], "--kd-temperature -1.0 must be > 0"),
    (["--kd-temperature", "nan"], "--kd-temperature nan is not a finite number"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0 must be >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size 0 must be >= 1"),
    (["--seq-length", "0"], "--seq-length 0 must be >= 1"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size 0 must be >= 1"),
    (["--pipeline-model-parallel-size", "0"], "--pipeline-model-parallel-size 0 must be >= 1"),
    (["--train-iters", "0"], "--train-iters 0 must be >= 1"),
    (["--lr", "-1"], "--lr -1.0 must be >= 0"),
    (["--lr", "inf"], "--lr inf is not a finite number"),
    (["--eval-iters", "0"], "--eval-iters 0 must be >= 1"),
    (["--log-interval", "0"], "--log-interval 0 must be >= 1"),
    (["--original-model-sample-prob", "1.5"], "--original-model-sample-prob 1.5 must be >= 0"),
    (["--router-lr", "0"], "--router-lr 0.0 must be > 0"),
    (["--split", "abc"], "--split 'abc': expected up to three non-negative"),
    (["--split", "0,0,0"], "--split '0,0,0': the weights sum to 0"),
    (["--split", "1,2,3,4"], "--split '1,2,3,4': expected up to three"),
    (["--lr-decay-iters", "ten"], "--lr-decay-iters: invalid int value: 'ten'"),
    (["--seq-length", "1.5"], "--seq-length: invalid int value: '1.5'"),
    (
        ["--bf16", "--use-distributed-optimizer", "--weight-decay", "0.1"],
        "--weight-decay 0.1 with --bf16 and --use-distributed-optimizer is not supported",
    ),
    (["--save", "/dev/null"], "--save /dev/null is a file; it must be a folder"),
]


@pytest.mark.parametrize(
    "extra, message",
    REFUSED_FLAGS,
)
def test_inconsistent_settings_fail_before_training(data, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--data-path", *data, *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_path_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data-path", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "--data-path: missing" in err and "nowhere.bin" in err


def _value_of(kind, choices):
    """A command-line value of the declared type, other than the default."""
    if choices:
        return [str(choices[-1])]
    return {int: ["3"], float: ["0.25"], str: ["some-text"]}[kind]


def test_every_flag_parses_to_its_declared_type():
    """Types come from the dataclass hints (not from defaults): --lr-decay-iters (default None)
    is an int, list flags hold their element type, switches are bools."""
    import typing

    from megatron_flextron.training.arguments import _GROUPS, _unwrap

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    argv, expected = [], {}
    for cls in _GROUPS.values():
        for name, hint in typing.get_type_hints(cls).items():
            kind, is_list = _unwrap(hint)
            flag = "--" + name.replace("_", "-")
            if kind is bool:
                argv.append(flag)
                expected[name] = True
                continue
            value = _value_of(kind, actions[name].choices) * (2 if is_list else 1)
            argv += [flag, *value]
            parsed = [kind(v) for v in value]
            expected[name] = parsed if is_list else parsed[0]
    ns = vars(parser.parse_args(argv))
    for name, want in expected.items():
        assert ns[name] == want and type(ns[name]) is type(want), (name, ns[name])
        if isinstance(want, list):
            assert all(type(v) is type(want[0]) for v in ns[name]), name
    assert ns["lr_decay_iters"] == 3 and ns["save_interval"] == 3


def test_lr_decay_iters_is_an_int(data):
    args = parse_args(["--data-path", *data, "--lr-decay-iters", "100", "--train-iters", "50"])
    assert args.optimizer.lr_decay_iters == 100 and isinstance(args.optimizer.lr_decay_iters, int)
