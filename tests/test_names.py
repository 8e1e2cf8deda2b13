"""`iterate --name` is one folder under --runs-dir: a bad name is one line of error and creates nothing."""

import pytest
from click.testing import CliRunner

from selfreward.cli import _run_name, cli
from selfreward.errors import SelfRewardError

BAD = ["../x", "..", ".", "a/b", "/tmp/abs", "a\\b", ".hidden", "", "my run", "nul\x00name", "tab\tname",
       "line\nbreak", "x" * 101, "é"]


@pytest.mark.parametrize("name", BAD, ids=repr)
def test_iterate_refuses_a_bad_run_name(tmp_path, name):
    runs = tmp_path / "runs"
    # --model points nowhere: had the name passed, iterate would fail later, not on the name.
    result = CliRunner().invoke(cli, ["iterate", "--runs-dir", str(runs), "--name", name, "--preset", "tiny",
                                      "--model", str(tmp_path / "no-model")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: bad run name"), result.output
    assert list(tmp_path.iterdir()) == []  # not runs/, not ../x, nothing


@pytest.mark.parametrize("name", ["demo", "M3-lora_0.5", "a", "x" * 100, "-dash", "_under", "a..b"])
def test_good_run_names(name):
    assert _run_name(name) == name


def test_a_trailing_newline_is_not_a_good_name():
    with pytest.raises(SelfRewardError, match="bad run name"):
        _run_name("demo\n")
