"""The README is a front page that points at docs/, and what it and docs/ say stays true: every command
has help with an example and is in the README's tour, every link resolves, and the benchmark tables are
the figures of the dated runs in bench/results/."""

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from selfreward.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path, cmd", list(commands(cli)), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_command_has_help_with_example_and_is_in_the_readme_tour(path, cmd):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    assert cmd.help and "Example:" in cmd.help
    assert re.search(rf"^selfreward {re.escape(' '.join(path))}( |$)", section(README, "CLI tour"), re.M)


def test_the_readme_is_a_front_page_with_the_two_commands():
    assert len(README.splitlines()) < 300
    block = re.search(r"```bash\n(.*?)```", section(README, "Two commands"), re.S)[1]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    linked = {(ROOT / target).resolve() for target in LINK.findall(README) if not target.startswith(("http", "#"))}
    assert set(PAGES) <= linked, "a docs page the README does not link to"
    schema = (ROOT / "docs" / "schema.md").read_text()
    for name in re.findall(r"`(\w+)`", section(README, "Run store").partition("[docs/schema.md]")[0]):
        assert f"## `{name}`" in schema, f"the README names a table that run.db does not have: {name}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_link_resolves(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: no heading for #{anchor} in {dest.name}"


def table(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with `header`."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_benchmark_tables_are_the_figures_of_bench_results():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    results = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert results
    for path in results:
        assert f"../bench/results/{path.name}" in doc, f"docs/benchmarks.md does not link {path.name}"
    record = json.loads((ROOT / "bench" / "results" / "2026-12-05T05-36-bench.json").read_text())

    def shown(value, unit):
        return ("yes" if value else "NO") if unit == "bool" else f"{value:.4f}" if unit == "nats" else f"{value:.2f}"

    assert table(doc, "| part | measurement |") == [
        [r["part"], r["measurement"], shown(r["value"], r["unit"]), "" if r["unit"] == "bool" else r["unit"],
         "" if r["ratio"] is None else f"{r['ratio']:.2f}x"] for r in record["rows"]]
    training = {row[0]: row for row in table(doc, "| variant | steps |")}
    assert set(training) == {r["variant"] for r in record["parts"]["training"]["results"]}
    for r in record["parts"]["training"]["results"]:
        row = training[r["variant"]]
        assert (row[2], row[3], row[4], row[9]) == (f"{r['s_per_seq']:.2f}", f"{r['speed_x']:.2f}",
                                                    f"{r['train_peak_mib']:.0f}", f"{r['merge_gap']:.4f}")
