import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fixture_run import build_fixture_run, kept_pairs

from selfreward import __version__
from selfreward.cli import cli
from selfreward.errors import SelfRewardError
from selfreward.evaluation.judge_commands import store_metrics
from selfreward.data.labels import import_labels
from selfreward.inspection.export import LABELING_CONFIG, export_alpaca_eval, export_label_studio, export_pairs

TRL_COLUMNS = {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "pair_id", "prompt_id", "chosen_id",
               "rejected_id", "chosen_judgment_ids", "rejected_judgment_ids", "round"}


H2H_PROMPTS = ["Name three <tags> & why", "Explain tides", "Write a haiku about rust"]


def add_head2head(run, a, b, eval_id, tag="", prompts=H2H_PROMPTS, dataset="data/heldout prompts.jsonl"):
    """An `eval head2head` result as that command stores it: answers of a and b, and the summary."""
    rows = [{"eval_id": eval_id, "prompt": p, "a_model": a, "b_model": b, "a_text": f"{a}{tag} answers: {p}",
             "b_text": f"{b}{tag} answers: {p}\n\"quoted\"", "a_tokens": 5, "b_tokens": 7, "outcome": "win",
             "judge": "scripted"} for p in prompts]
    store_metrics(run, "head2head", "scripted", f"{a} vs {b}", dataset, {"n": len(rows)}, eval_id, rows)


@pytest.fixture
def run(tmp_path):
    run = build_fixture_run(tmp_path / "r")
    add_head2head(run, "M1", "M2", "h1")
    return run


def _check_rows(run, rows, t):
    pairs = kept_pairs(run, t)
    assert len(rows) == len(pairs) == 2
    for row, pair in zip(rows, pairs):
        assert set(row) == TRL_COLUMNS
        texts = {c["id"]: c["text"] for c in run.rows("select id, text from candidates")}
        prompt = run.rows("select text from prompts where id=?", [pair["prompt_id"]])[0]["text"]
        assert row["prompt"] == [{"role": "user", "content": prompt}]
        assert row["chosen"] == [{"role": "assistant", "content": texts[pair["chosen_id"]]}]
        assert row["rejected"] == [{"role": "assistant", "content": texts[pair["rejected_id"]]}]
        assert (row["chosen_id"], row["rejected_id"], row["pair_id"], row["round"]) == \
               (pair["chosen_id"], pair["rejected_id"], pair["id"], t)
        assert row["chosen_score"] == pair["chosen_score"] > row["rejected_score"] == pair["rejected_score"]
        for side in ("chosen", "rejected"):
            judged = run.rows("select id from judgments where candidate_id=? order by id", [row[f"{side}_id"]])
            assert list(row[f"{side}_judgment_ids"]) == [j["id"] for j in judged]


def test_export_jsonl(run, tmp_path):
    out = tmp_path / "x" / "pairs.jsonl"
    assert export_pairs(run, 2, out, "jsonl") == 2
    _check_rows(run, [json.loads(line) for line in out.read_text().splitlines()], 2)
    assert [p.name for p in out.parent.iterdir()] == ["pairs.jsonl"]


def test_export_parquet(run, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "pairs.parquet"
    assert export_pairs(run, 3, out, "parquet") == 2
    _check_rows(run, pq.read_table(out).to_pylist(), 3)


def test_export_datasets_replaces_an_older_export_with_force(run, tmp_path):
    import datasets

    out = tmp_path / "ds"
    export_pairs(run, 3, out, "datasets")
    with pytest.raises(SelfRewardError, match="not empty.*--force"):
        export_pairs(run, 2, out, "datasets")
    assert export_pairs(run, 2, out, "datasets", force=True) == 2
    _check_rows(run, datasets.load_from_disk(str(out)).to_list(), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "r"]


@pytest.mark.parametrize("t, match", [(1, "no kept pairs"), (7, "round 7 is not in run")])
def test_export_without_kept_pairs_is_an_error(run, tmp_path, t, match):
    with pytest.raises(SelfRewardError, match=match):
        export_pairs(run, t, tmp_path / "p.jsonl", "jsonl")
    assert not (tmp_path / "p.jsonl").exists()


def test_export_unknown_format(run, tmp_path):
    with pytest.raises(SelfRewardError, match="unknown export format"):
        export_pairs(run, 2, tmp_path / "p.csv", "csv")


# --- Label Studio ---

def _annotated(tasks, rankings, cancelled=(), ranker_as_list=False):
    """A Label Studio JSON export: tasks as imported, each with one annotation ranking its items."""
    out = []
    for n, (task, order) in enumerate(zip(tasks, rankings), start=1):
        ids = [task["data"]["items"][k]["id"] for k in order]
        value = {"ranker": ids if ranker_as_list else {"rank": ids}}
        out.append({"id": 1000 + n, "data": task["data"], "annotations": [{
            "id": 500 + n, "completed_by": 7, "was_cancelled": n in cancelled,
            "result": [{"id": "r1", "from_name": "rank", "to_name": "answers", "type": "ranker", "value": value,
                        "origin": "manual"}]}]})
    return out


def _write(path, export):
    path.write_text(json.dumps(export))
    return path


def test_label_studio_tasks_and_config(run, tmp_path):
    assert export_label_studio(run, 2, tmp_path / "ls") == 4
    assert (tmp_path / "ls" / "labeling_config.xml").read_text() == LABELING_CONFIG
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    first = tasks[0]["data"]
    cands = run.rows("select id, text from candidates where prompt_id=? order by idx", [first["prompt_id"]])
    assert first["prompt"].startswith("Round 2 prompt 0")
    assert first["items"] == [{"id": f"c{c['id']}", "title": f"Response {k}", "body": c["text"]}
                              for k, c in enumerate(cands, start=1)]


def test_label_studio_round_trip(run, tmp_path):
    export_label_studio(run, 2, tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    before = run.db["judgments"].count
    export = _annotated(tasks[:2], [[2, 0, 1], [1, 2, 0]])
    counts = import_labels(run, _write(tmp_path / "export.json", export), round=2)
    assert counts == {"tasks": 2, "annotations": 2, "judgments": 6, "skipped_cancelled": 0, "skipped_existing": 0,
                      "skipped_no_id": 0, "skipped_duplicate": 0}
    rows = run.rows("select * from judgments where judge like 'human:%' order by id")
    assert len(rows) == 6 == run.db["judgments"].count - before
    first = tasks[0]["data"]["items"]
    by_candidate = {f"c{r['candidate_id']}": r for r in rows}
    assert [by_candidate[first[k]["id"]]["score"] for k in (2, 0, 1)] == [5.0, 2.5, 0.0]
    best = by_candidate[first[2]["id"]]
    assert best["judge"] == "human:7" and best["round"] == 2 and best["reason"] is None
    assert best["version"] == __version__ and best["judge_model_sha"] is None and best["template_sha"] is None
    assert best["rationale"] == "Label Studio annotation 501: ranked 1 of 3"
    assert json.loads(best["raw"])["value"] == {"ranker": {"rank": [first[k]["id"] for k in (2, 0, 1)]}}
    # The model judged each candidate twice (samples 0, 1): the human label is the next sample.
    assert {r["sample"] for r in rows} == {2} and best["created_at"]
    # Importing the same export again adds nothing.
    again = import_labels(run, tmp_path / "export.json")
    assert again["judgments"] == 0 and again["skipped_existing"] == 2


def test_label_studio_older_list_shape_and_cancelled(run, tmp_path):
    export_label_studio(run, 3, tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    export = _annotated(tasks, [[0, 1, 2]] * 4, cancelled={2, 3}, ranker_as_list=True)
    counts = import_labels(run, _write(tmp_path / "export.json", export))
    assert counts["annotations"] == 2 and counts["skipped_cancelled"] == 2 and counts["judgments"] == 6
    scores = [r["score"] for r in run.rows("select score from judgments where judge='human:7' order by id")]
    assert scores == [5.0, 2.5, 0.0] * 2


def test_label_studio_annotation_without_id_or_twice_in_a_file_is_skipped(run, tmp_path):
    export_label_studio(run, 2, tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    export = _annotated(tasks[:3], [[0, 1, 2], [2, 1, 0], [1, 0, 2]])
    export[0]["annotations"].append(dict(export[0]["annotations"][0]))  # exported twice
    del export[1]["annotations"][0]["id"]
    export[2]["annotations"].append({**export[2]["annotations"][0], "id": None})
    counts = import_labels(run, _write(tmp_path / "export.json", export))
    assert counts["annotations"] == 2 and counts["judgments"] == 6
    assert counts["skipped_duplicate"] == 1 and counts["skipped_no_id"] == 2
    per_candidate = run.rows("select candidate_id, count(*) n from judgments where judge like 'human:%' "
                             "group by candidate_id")
    assert len(per_candidate) == 6 and {r["n"] for r in per_candidate} == {1}


def test_human_labels_stay_out_of_model_score_means(run, tmp_path):
    import sqlite3

    from selfreward.inspection.browse import QUERIES
    from selfreward.inspection.status import show_prompt

    def views():
        db = sqlite3.connect(run.path / "run.db")
        out = [db.execute(QUERIES[q]["sql"], {"min_spread": 0}).fetchall() for q in ("low_agreement",
                                                                                   "score_distribution")]
        db.close()
        return out, show_prompt(run, 200)

    before = views()
    export_label_studio(run, 2, tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert import_labels(run, _write(tmp_path / "export.json", _annotated(tasks[:1], [[2, 1, 0]])))["judgments"] == 3
    after = views()
    assert after[0] == before[0]
    shown = after[1]
    assert "[human:7]" in shown and shown.count("mean score") == before[1].count("mean score")
    means = [line.split("mean score ")[1] for text in (before[1], shown) for line in text.splitlines()
             if "mean score" in line]
    assert means[:3] == means[3:]  # 4.50, 2.50, 1.00: the model judge's, labels listed but not averaged in


def test_label_studio_bad_input_writes_nothing(run, tmp_path):
    export_label_studio(run, 2, tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    before = run.db["judgments"].count
    bad_id = _annotated(tasks, [[0, 1, 2]] * 4)
    bad_id[1]["data"]["items"] = []  # a task edited in Label Studio: only the ranking is checked
    bad_id[1]["annotations"][0]["result"][0]["value"]["ranker"]["rank"][0] = "c999999"
    with pytest.raises(SelfRewardError, match="task 1002.*unknown candidate id c999999"):
        import_labels(run, _write(tmp_path / "bad.json", bad_id))
    no_ranker = _annotated(tasks, [[0, 1, 2]])
    no_ranker[0]["annotations"][0]["result"] = []
    with pytest.raises(SelfRewardError, match="task 1001.*no ranker result"):
        import_labels(run, _write(tmp_path / "bad.json", no_ranker))
    (tmp_path / "bad.json").write_text("[{not json")
    with pytest.raises(SelfRewardError, match="not valid JSON"):
        import_labels(run, tmp_path / "bad.json")
    with pytest.raises(SelfRewardError, match="not round 3"):
        import_labels(run, _write(tmp_path / "bad.json", _annotated(tasks, [[0, 1, 2]])), round=3)
    assert run.db["judgments"].count == before


def test_label_studio_round_without_candidates(run, tmp_path):
    with pytest.raises(SelfRewardError, match="no candidates"):
        export_label_studio(run, 1, tmp_path / "ls")


# --- AlpacaEval ---

def test_alpaca_eval_one_file_per_model_in_alpaca_evals_format(run, tmp_path):
    # M1 answers the same prompts again against M3 (and one new prompt): its latest answers count.
    add_head2head(run, "M1", "M3", "h2", tag=" again", prompts=H2H_PROMPTS[1:] + ["A fourth prompt"],
                  dataset="other/ift_heldout.jsonl")
    assert export_alpaca_eval(run, tmp_path / "ae") == {"M1": 4, "M2": 3, "M3": 3}
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["M1.json", "M2.json", "M3.json"]
    outputs = {m: json.loads((tmp_path / "ae" / f"{m}.json").read_text(encoding="utf-8")) for m in ("M1", "M2", "M3")}
    assert outputs["M2"] == [{"instruction": p, "output": f"M2 answers: {p}\n\"quoted\"", "generator": "r-M2",
                              "dataset": "heldout prompts"} for p in H2H_PROMPTS]
    assert outputs["M1"][0] == {"instruction": H2H_PROMPTS[0], "output": f"M1 answers: {H2H_PROMPTS[0]}",
                                "generator": "r-M1", "dataset": "heldout prompts"}
    assert [r["output"] for r in outputs["M1"][1:]] == [f"M1 again answers: {p}" for p in H2H_PROMPTS[1:]] + \
        ["M1 again answers: A fourth prompt"]
    assert {r["dataset"] for r in outputs["M3"]} == {"ift_heldout"}
    # One prompt order in every file, so the files line up prompt by prompt.
    assert [r["instruction"] for r in outputs["M3"]] == [r["instruction"] for r in outputs["M1"][1:]]


def test_alpaca_eval_without_head_to_heads_is_one_error(tmp_path):
    build_fixture_run(tmp_path / "runs" / "demo").db.close()
    result = _export(tmp_path / "runs", tmp_path / "ae", "alpaca-eval")
    _refused(result, "no answers to held-out prompts yet")
    assert "eval head2head" in result.output and not (tmp_path / "ae").exists()


def test_round_is_for_the_round_formats_only(runs, tmp_path):
    args = ["export", "demo", "--runs-dir", str(runs), "--out", str(tmp_path / "x")]
    _refused(CliRunner().invoke(cli, args + ["--format", "alpaca-eval", "--round", "2"]), "--round does not apply")
    _refused(CliRunner().invoke(cli, args + ["--format", "jsonl"]), "--format jsonl needs --round")
    assert not (tmp_path / "x").exists()


def test_alpaca_eval_end_to_end(judged_run, judge_script, seed_files, tmp_path):
    """A real run's head-to-head through the CLI, then its answers exported through the CLI."""
    runner = CliRunner()
    h2h = runner.invoke(cli, ["eval", "head2head", str(judged_run.path), "--a", "M1", "--b", "M2", "--prompts",
                              str(seed_files["ift"]), "--limit", "3", "--judge", "scripted", "--judge-script",
                              str(judge_script)])
    assert h2h.exit_code == 0, h2h.output
    out = tmp_path / "alpaca"
    result = runner.invoke(cli, ["export", str(judged_run.path), "--format", "alpaca-eval", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # each model's greedy answers from the loop's eval stage (the tiny preset's 4 verifiable prompts), then the
    # head-to-head's
    assert result.output.strip() == f"wrote M0.json (4 answers), M1.json (7 answers), M2.json (7 answers) to {out}"
    stored = judged_run.rows("select prompt, a_text, b_text from head2head order by id")
    for model, column in (("M1", "a_text"), ("M2", "b_text")):
        records = json.loads((out / f"{model}.json").read_text(encoding="utf-8"))
        loop = judged_run.rows("select prompt, text from eval_answers where model = ? order by id", [model])
        assert records[:4] == [{"instruction": a["prompt"], "output": a["text"], "generator": f"b-{model}",
                                "dataset": "if_eval"} for a in loop]
        assert records[4:] == [{"instruction": h["prompt"], "output": h[column], "generator": f"b-{model}",
                                "dataset": seed_files["ift"].stem} for h in stored]


# --- the export target: never delete or replace what export did not write ---

FOLDER_FORMATS = {"datasets", "label-studio", "alpaca-eval"}
ALL_FORMATS = ["jsonl", "parquet", "datasets", "label-studio", "alpaca-eval"]


@pytest.fixture
def runs(tmp_path):
    """runs/demo, closed, so its files on disk are all there is to compare."""
    run = build_fixture_run(tmp_path / "runs" / "demo")
    add_head2head(run, "M1", "M3", "h1")
    run.db.close()
    return tmp_path / "runs"


def _export(runs, out, fmt, t=2, force=False):
    args = ["export", "demo", "--runs-dir", str(runs), "--format", fmt, "--out", str(out)]
    args += [] if fmt == "alpaca-eval" else ["--round", str(t)]  # it exports every model, not a round
    return CliRunner().invoke(cli, args + ["--force"] * force)


def _refused(result, match):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], result.output


def _snapshot(folder):
    """Every file under folder, with a hash of its bytes. A reader's read-only connection cannot remove
    SQLite's WAL index (-shm) and empty log (-wal) when it closes: neither holds run data."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))
            if not (p.name.endswith("-shm") or p.name.endswith("-wal") and p.stat().st_size == 0)}


def _exported_rows(out, fmt):
    if fmt == "jsonl":
        return [json.loads(line) for line in out.read_text().splitlines()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    if fmt == "datasets":
        import datasets

        return datasets.load_from_disk(str(out)).to_list()
    if fmt == "alpaca-eval":
        return [r for f in sorted(out.glob("M*.json")) for r in json.loads(f.read_text())]
    return json.loads((out / "tasks.json").read_text())


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_export_refuses_a_folder_holding_a_user_file(runs, tmp_path, fmt):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for force in (False, True) if fmt not in FOLDER_FORMATS else (False,):
        _refused(_export(runs, out, fmt, force=force), str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "runs"]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_export_refuses_an_existing_file(runs, tmp_path, fmt):
    out = tmp_path / "mine.out"
    out.write_text("my data")
    _refused(_export(runs, out, fmt), str(out))
    if fmt in FOLDER_FORMATS:
        _refused(_export(runs, out, fmt, force=True), "is a file")
    assert out.read_text() == "my data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.out", "runs"]


@pytest.mark.parametrize("where", ["demo", "demo/sub/deeper", "demo/models", "demo/run.db"])
def test_export_inside_a_run_folder_is_refused_even_with_force(runs, where):
    before = _snapshot(runs)
    for fmt in ALL_FORMATS:
        for force in (False, True):
            _refused(_export(runs, runs / where, fmt, force=force), "inside the run folder")
        assert _snapshot(runs) == before, fmt  # run.db byte for byte, and nothing added


def test_export_through_a_path_that_leads_back_into_the_run_is_refused(runs, tmp_path):
    before = _snapshot(runs)
    _refused(_export(runs, tmp_path / "elsewhere" / ".." / "runs" / "demo" / "x", "datasets"), "inside the run")
    (tmp_path / "link").symlink_to(runs / "demo")
    _refused(_export(runs, tmp_path / "link" / "pairs.jsonl", "jsonl", force=True), "inside the run")
    assert _snapshot(runs) == before and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_export_force_over_a_previous_export(runs, tmp_path, fmt):
    out = tmp_path / "export"
    assert _export(runs, out, fmt, t=3).exit_code == 0
    if fmt in FOLDER_FORMATS:
        (out / "notes.txt").write_text("kept")  # a user's file beside ours survives --force
    before = _snapshot(tmp_path / "export") if fmt in FOLDER_FORMATS else out.read_bytes()
    _refused(_export(runs, out, fmt, t=2), str(out))
    assert (_snapshot(out) if fmt in FOLDER_FORMATS else out.read_bytes()) == before
    result = _export(runs, out, fmt, t=2, force=True)
    assert result.exit_code == 0, result.output
    rows = _exported_rows(out, fmt)
    if fmt == "label-studio":
        assert len(rows) == 4 and all(task["data"]["prompt"].startswith("Round 2") for task in rows)
    elif fmt == "alpaca-eval":
        assert len(rows) == 6 and {r["generator"] for r in rows} == {"demo-M1", "demo-M3"}
    else:
        assert {r["round"] for r in rows} == {2} and len(rows) == 2
    if fmt in FOLDER_FORMATS:
        assert (out / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "runs"]  # no temporary left


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_export_into_an_empty_folder_or_a_new_path(runs, tmp_path, fmt):
    (tmp_path / "out" / "empty").mkdir(parents=True)
    target = tmp_path / "out" / "empty" if fmt in FOLDER_FORMATS else tmp_path / "out" / "empty" / "pairs.out"
    result = _export(runs, target, fmt)
    assert result.exit_code == 0, result.output
    assert _exported_rows(target, fmt)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_a_failed_export_leaves_nothing_half_written(run, tmp_path, monkeypatch):
    import datasets

    def broken(self, path, **kw):
        Path(path).mkdir()
        (Path(path) / "data-00000-of-00001.arrow").write_text("half")
        raise OSError("disk full")

    out = tmp_path / "ds"
    export_pairs(run, 3, out, "datasets")
    before = _snapshot(out)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken)
    with pytest.raises(OSError, match="disk full"):
        export_pairs(run, 2, out, "datasets", force=True)
    with pytest.raises(OSError, match="disk full"):
        export_pairs(run, 2, tmp_path / "new", "datasets")
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "r"]
