"""Every command has help with an example, and the README lists every command."""

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from selfreward.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path, cmd", list(commands(cli)), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_command_has_help_with_example(path, cmd):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    assert cmd.help and "Example:" in cmd.help
    assert f"selfreward {' '.join(path)}" in README
