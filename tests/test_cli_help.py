"""`--help` alone should be enough to use a command: every flag explains itself and states its
default (or that it is required), and `--version` names the installed release."""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Iterator

import pytest

from avpgan import builtin_configs
from avpgan.cli import build_parser, main

COMMANDS = {("config", "list"), ("config", "show"), ("config", "doc"), ("synth",), ("shards", "build"),
            ("shards", "check"), ("bank", "build"), ("train",), ("export",), ("import-voice2face",),
            ("evaluate",), ("generate",), ("serve",)}


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser under `parser` (itself included), with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, path + (name,))


ALL = dict(parsers(build_parser()))


def test_the_walk_reaches_every_command():
    assert COMMANDS <= set(ALL)


@pytest.mark.parametrize("path", sorted(ALL), ids=lambda p: " ".join(p) or "avpgan")
def test_every_argument_has_help_and_every_flag_its_default(path):
    parser = ALL[path]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if isinstance(action, argparse._SubParsersAction):  # the command list: each command's line
            for command in action._choices_actions:
                assert command.help and command.help.strip(), f"avpgan {' '.join(path)} {command.dest} has no help"
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"avpgan {' '.join(path)}: {name} has no help"
        if action.option_strings:
            shown = formatter._get_help_string(action) % vars(action)
            assert "default: None" not in shown, f"{name}: say what happens without it instead of None"
            assert "(required)" in shown or "default" in shown, f"{name}: help states no default: {shown!r}"


@pytest.mark.parametrize("path", sorted(ALL), ids=lambda p: " ".join(p) or "avpgan")
def test_help_names_nothing_an_installed_avpgan_lacks(path):
    """The help of an installed avpgan points at commands, not at the repository's files."""
    text = ALL[path].format_help()
    for repo_only in ("docs/", "README", "configs/"):
        assert repo_only not in text, f"avpgan {' '.join(path)} --help mentions {repo_only}"


def test_train_help_shows_defaults_and_required(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(required)" in out and "(default: auto)" in out


def test_version_is_the_installed_release(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"avpgan {importlib.metadata.version('avpgan')}\n"


def test_config_list_names_each_built_in_config_with_its_first_comment_line(capsys):
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == builtin_configs.names()
    assert {"avpgan.yaml", "tiny.yaml"} <= set(builtin_configs.names())
    for line, name in zip(lines, builtin_configs.names()):
        description = builtin_configs.description(name)
        assert description.endswith(".") and line.endswith(description), f"{name}: the first line should be a " \
                                                                          f"comment sentence saying what it is"
