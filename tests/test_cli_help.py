"""Every ``--help`` is plain text; the top-level help says where to start; shared flags mean one thing."""

import argparse
import re

import pytest

from learned_opt.cli import COMMANDS, build_parser, main as cli_main

RST = re.compile(r"``|:(class|func|meth|mod|attr|data|obj|exc):`")


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_plain_and_points_at_the_demo(capsys):
    text = help_of([], capsys)
    assert not RST.search(text), text
    assert "learned-opt demo" in text and "OMP_NUM_THREADS" in text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_help_is_plain_text(command, capsys):
    text = help_of([command], capsys)
    assert not RST.search(text), f"learned-opt {command} --help shows markup:\n{text}"


def test_device_defaults_to_auto_wherever_it_is_offered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    offered = 0
    for name, p in sub.choices.items():
        for action in p._actions:
            if "--device" in action.option_strings:
                offered += 1
                assert "(default: auto)" in action.help, f"learned-opt {name} --device: {action.help}"
                assert p.get_default(action.dest) in ("auto", argparse.SUPPRESS), name  # train: its config's auto
    assert offered >= 4


def test_tune_sampling_takes_sampling_steps_and_the_old_spelling_with_a_note(capsys):
    parser = build_parser()
    args = parser.parse_args(["tune-sampling", "--generator", "mnist-mlp", "--sampling-steps", "1,2"])
    assert args.sampling_steps == "1,2"
    args = parser.parse_args(["tune-sampling", "--generator", "mnist-mlp", "--steps", "4"])
    assert args.sampling_steps == "4"
    assert "use --sampling-steps" in capsys.readouterr().err
    assert "--steps" not in help_of(["tune-sampling"], capsys).replace("--sampling-steps", "")
