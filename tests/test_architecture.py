"""The package's shape: no import cycle among selfreward.* modules, no module importing another's
`_private` name, and one place per judge and per training method: a toy judge and a toy method,
registered from here, show up in --help, in `status` and in the HTML report."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_run import STAMP, build_fixture_run

import selfreward
from selfreward.backends.judges import JUDGES, GroupResult, JudgeKind, Verdict
from selfreward.cli import cli
from selfreward.core.store import Run
from selfreward.inspection.report import build_report
from selfreward.prompts import Parsed
from selfreward.training.methods import METHODS, Method

PACKAGE = Path(selfreward.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(modules: dict[str, Path]):
    """(importer, imported module, name or None) for every import of a selfreward module, at the top
    of a file or inside a function alike: a function's import re-enters a module just the same."""
    def owner(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("selfreward"):
                        yield module, owner(alias.name), None
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("selfreward") \
                    and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        yield module, full, None
                    else:
                        yield module, owner(node.module), alias.name


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    edges = {m: set() for m in modules}
    for importer, imported, _ in _imports(modules):
        if imported != importer:
            edges[importer].add(imported)
    assert "selfreward.training.fit" in edges["selfreward.training.recipes"]  # the walk sees imports at all
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    private = [(importer, f"{imported}.{name}") for importer, imported, name in _imports(modules)
               if name and name.startswith("_") and not name.startswith("__") and imported != importer]
    assert private == []



def _reaches(importer_prefix: str, imported_prefixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(importer, imported) for each import, at the top of a file or in a function, from a module under
    importer_prefix of a module under one of imported_prefixes."""
    def under(module, prefix):
        return module == prefix or module.startswith(prefix + ".")

    return sorted({(importer, imported) for importer, imported, _ in _imports(_modules())
                   if under(importer, importer_prefix) and any(under(imported, p) for p in imported_prefixes)})


def test_inspection_starts_no_engine_and_never_runs_the_loop():
    """inspection reads run.db: it never imports the engines, a stage's context (which starts them), the loop,
    or the evaluation commands that judge and write."""
    assert _reaches("selfreward.inspection", ("selfreward.backends.engines", "selfreward.core.context",
                                              "selfreward.core.loop", "selfreward.evaluation",
                                              "selfreward.data.labels")) == []



def _dump(db_path: Path) -> list[str]:
    import sqlite3

    con = sqlite3.connect(db_path)
    try:
        con.execute("pragma wal_checkpoint(truncate)")  # what a command left in the WAL counts too
        return list(con.iterdump())
    finally:
        con.close()


def test_the_inspection_commands_write_nothing_to_run_db(tmp_path):
    build_fixture_run(tmp_path / "r").close()
    before = _dump(tmp_path / "r" / "run.db")
    where = ["--runs-dir", str(tmp_path)]
    for command in (["status", "r", "--stages"], ["status", "r", "--json"], ["show", "r", "200"],
                    ["show", "r", "--pair", "1"], ["verify", "r"], ["rationales", "r", "--round", "2"],
                    ["report", "r"], ["export", "r", "--round", "2", "--out", str(tmp_path / "pairs.jsonl")]):
        result = CliRunner().invoke(cli, command + where)
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "pairs.jsonl").stat().st_size and (tmp_path / "r" / "report" / "report.html").is_file()
    assert _dump(tmp_path / "r" / "run.db") == before

def test_the_core_never_imports_inspection_and_backends_never_import_the_core():
    assert _reaches("selfreward.core", ("selfreward.inspection",)) == []
    assert _reaches("selfreward.backends", ("selfreward.core",)) == []


def test_the_layer_check_sees_imports():
    assert ("selfreward.core.stages.judge_eval", "selfreward.evaluation.judge_quality") in \
        _reaches("selfreward.core", ("selfreward.evaluation",))
    assert ("selfreward.backends.judges.scripted", "selfreward.failpoints") in \
        _reaches("selfreward.backends", ("selfreward.failpoints",))

# --- a toy judge and a toy method, registered from here ---

class ToyJudge:
    """Scores an answer by its length: one verdict per sample, no model."""

    name, template_sha = "toy:length", None

    def judge_groups(self, groups, samples, seed):
        return [GroupResult([[Verdict(None, Parsed(float(min(5, len(r) // 8)), None, None))] * samples
                             for r in g.responses]) for g in groups]


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(JUDGES, "toy-judge", JudgeKind(lambda cfg, engine_for, label: ToyJudge(),
                                                       holds_memory=False))
    monkeypatch.setitem(METHODS, "toy-method", Method("dpo", "Toy"))


@pytest.fixture
def toy_run(tmp_path):
    """The fixture run with a round 4 whose M4 the toy method trained."""
    run = build_fixture_run(tmp_path / "r")
    run.db["rounds"].insert({"round": 4, "model_in": "M3", "model_out": "M4", "started_at": STAMP,
                             "finished_at": STAMP, "wall_s": 60.0})
    run.db["models"].insert({"name": "M4", "round": 4, "kind": "toy-method-lora", "parent": "M3", "path": "base",
                             "adapter_path": "models/M4", "note": None, "created_at": STAMP})
    run.db["training_steps"].insert_all(
        {"round": 4, "kind": "toy-method", "step": s, "epoch": s / 2, "loss": 0.5 + 0.25 * s, "learning_rate": 1e-5,
         "grad_norm": 1.0, "rewards_margin": None, "rewards_accuracy": None, "rewards_chosen": None,
         "rewards_rejected": None} for s in (1, 2))
    run.close()  # the commands below open it themselves
    return Run.open(run.path)


def _status(run) -> dict:
    result = CliRunner().invoke(cli, ["status", run.path.name, "--runs-dir", str(run.path.parent), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_without_its_entry_a_methods_loss_is_not_shown(toy_run):
    assert _status(toy_run)["rounds"][3]["loss"] is None


def test_a_toy_judge_and_method_show_in_help_status_and_report(toys, toy_run, heldout):
    runner = CliRunner()
    for command in (["iterate", "--help"], ["eval", "judge", "--help"]):
        result = runner.invoke(cli, command)
        assert result.exit_code == 0 and "toy-judge" in result.output, result.output
    assert "toy-method" in runner.invoke(cli, ["iterate", "--help"]).output

    # The toy judge judges: `eval judge` builds it from its entry and stores its metrics.
    result = runner.invoke(cli, ["eval", "judge", "r", "--runs-dir", str(toy_run.path.parent), "--judge", "toy-judge",
                                 "--data", heldout, "--json"])
    assert result.exit_code == 0, result.output
    assert [row["judge"] for row in json.loads(result.output)] == ["toy:length"]

    # status names no judge of any kind; it shows the toy method's loss.
    assert _status(toy_run)["rounds"][3]["loss"] == pytest.approx(0.875)
    assert "0.875" in runner.invoke(cli, ["status", "r", "--runs-dir", str(toy_run.path.parent)]).output

    page = build_report(toy_run).read_text()
    assert "0.875" in page and "toy:length" in page
    assert 'alt="SFT and DPO / SimPO / Toy training curves"' in page
