"""`selfreward eval harness`: lm-evaluation-harness on the run's own models, offline, with tasks defined from local
files written by the test; metrics stored in eval_metrics; unknown or data-less tasks are one error line."""

import json
import os
import subprocess
import sys

import pytest
import sqlite_utils

pytest.importorskip("lm_eval", reason="the harness extra: pip install 'selfreward[harness]'")
from click.testing import CliRunner  # noqa: E402

from selfreward.cli import cli  # noqa: E402

# Loglikelihood of " x" is a prefix of that of " x x x x x x" (same first tokens, then more negative terms), so any
# model prefers the short choice: gold 0 on three docs of four makes acc exactly 0.75 (stderr 0.25), whatever the
# weights.
MC_DOCS = [{"question": f"Question {i}?", "choices": [" x", " x x x x x x"], "gold": 0 if i < 3 else 1}
           for i in range(4)]
QA_DOCS = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in ((1, 2), (2, 2), (3, 4))]


def _tasks(folder, data_dir=None):
    """Two tasks in lm-eval's YAML format, their data in JSONL files beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or folder
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in QA_DOCS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_dir / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (folder / "tiny_qa.yaml").write_text(f"""task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_dir / "qa.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} Answer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


def _harness(run, *args):
    return CliRunner().invoke(cli, ["eval", "harness", str(run.path), *args])


def test_local_tasks_end_to_end_store_each_metric_per_model(judged_run, tmp_path):
    tasks = _tasks(tmp_path / "tasks")
    result = _harness(judged_run, "--tasks", "tiny_mc,tiny_qa", "--models", "M0,M1", "--include-path", str(tasks),
                      "--no-chat-template", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)

    stored = list(judged_run.db.query("select * from eval_metrics where kind = 'harness'"))
    assert {(r["model"], r["dataset"], r["name"], r["value"]) for r in stored} == {
        (r["model"], r["task"], r["metric"], r["value"]) for r in rows}
    assert {r["judge"] for r in stored} == {"lm-eval"}
    # One eval_id per model and command, shared by its tasks.
    ids = {m: {r["eval_id"] for r in stored if r["model"] == m} for m in ("M0", "M1")}
    assert all(len(v) == 1 for v in ids.values()) and ids["M0"] != ids["M1"]
    values = {(r["model"], r["dataset"], r["name"]): r["value"] for r in stored}
    for model in ("M0", "M1"):
        assert values[(model, "tiny_mc", "acc")] == pytest.approx(0.75)
        assert values[(model, "tiny_mc", "acc_stderr")] == pytest.approx(0.25)
        assert values[(model, "tiny_mc", "n")] == 4
        assert 0 <= values[(model, "tiny_qa", "exact_match")] <= 1
        assert values[(model, "tiny_qa", "n")] == 3

    # --limit takes the first N documents; the table has one column per model.
    again = _harness(judged_run, "--tasks", "tiny_mc", "--models", "M1", "--include-path", str(tasks),
                     "--limit", "2", "--no-chat-template")
    assert again.exit_code == 0, again.output
    assert values[("M1", "tiny_mc", "acc")] == pytest.approx(0.75)
    latest = judged_run.db.execute("select value from eval_metrics where kind = 'harness' and model = 'M1' and "
                                   "dataset = 'tiny_mc' and name = 'acc' order by rowid desc limit 1").fetchone()
    assert latest[0] == 1.0  # the first two documents have gold 0
    header = again.stdout.splitlines()[0]
    assert header.split() == ["task", "metric", "M1"]
    assert any(line.split()[:3] == ["tiny_mc", "acc", "1"] for line in again.stdout.splitlines())


def test_the_chat_template_wraps_the_requests(judged_run, tmp_path):
    tasks = _tasks(tmp_path / "tasks")
    result = _harness(judged_run, "--tasks", "tiny_mc", "--models", "M1", "--include-path", str(tasks), "--json")
    assert result.exit_code == 0, result.output
    assert judged_run.db.execute("select value from eval_metrics where kind = 'harness' and name = 'acc'"
                                 ).fetchone()[0] == pytest.approx(0.75)


def _one_error_line(result, *parts):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    for part in parts:
        assert part in lines[0], lines[0]


def test_an_unknown_task_is_one_line_saying_how_to_find_tasks(judged_run, tmp_path):
    result = _harness(judged_run, "--tasks", "tiny_mc,no_such_task", "--include-path", str(_tasks(tmp_path / "t")))
    _one_error_line(result, "unknown lm-eval task: no_such_task", "lm-eval ls tasks", "--include-path")
    assert judged_run.db.execute("select count(*) from eval_metrics where kind = 'harness'").fetchone()[0] == 0


def test_a_task_without_local_data_is_one_line_naming_it(judged_run, tmp_path):
    tasks = _tasks(tmp_path / "tasks", data_dir=tmp_path / "missing")
    result = _harness(judged_run, "--tasks", "tiny_mc", "--include-path", str(tasks))
    _one_error_line(result, "lm-eval task 'tiny_mc'", "needs its data locally", "--include-path")


def test_a_stock_task_never_reaches_the_hub(judged_run, tmp_path):
    """gsm8k's data lives on the hub: offline, with an empty cache, it is one line before any model loads."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "selfreward", "eval", "harness", str(judged_run.path),
                           "--tasks", "gsm8k"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert lines and "lm-eval task 'gsm8k'" in lines[0] and "needs its data locally" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path):
    """The issue's check: `eval harness` on the embedded SmolLM2-135M, --limit 2, on tasks from local files. The
    run holds the embedded model as M0 (written with the store API: training a round first takes minutes here)."""
    from selfreward.backends.models import resolve_source
    from selfreward.config import resolve
    from selfreward.core.store import Run

    run = Run.create(tmp_path / "runs" / "e", resolve({}, {"preset": "tiny"}))
    run.db["models"].insert({"name": "M0", "round": 0, "kind": "base", "parent": None,
                             "path": resolve_source("embedded"), "adapter_path": None, "note": "source: embedded",
                             "created_at": "2026-12-05T00:00:00+00:00"})
    run.close()
    tasks = _tasks(tmp_path / "tasks")
    proc = subprocess.run([sys.executable, "-m", "selfreward", "eval", "harness", str(run.path), "--tasks",
                           "tiny_mc,tiny_qa", "--include-path", str(tasks), "--limit", "2", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {(r["model"], r["task"]) for r in json.loads(proc.stdout)} == {("M0", "tiny_mc"), ("M0", "tiny_qa")}
    db = sqlite_utils.Database(run.path / "run.db")
    values = {(r["dataset"], r["name"]): r["value"] for r in db.query(
        "select * from eval_metrics where kind = 'harness' and model = 'M0'")}
    assert values[("tiny_mc", "acc")] == 1.0 and values[("tiny_mc", "n")] == 2
    assert 0 <= values[("tiny_qa", "exact_match")] <= 1 and values[("tiny_qa", "n")] == 2
