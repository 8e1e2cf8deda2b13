import json

import pytest
from fixture_run import build_fixture_run, kept_pairs

from selfreward import __version__
from selfreward.errors import SelfRewardError
from selfreward.inspection.export import LABELING_CONFIG, export_label_studio, export_pairs, import_labels

TRL_COLUMNS = {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "pair_id", "prompt_id", "chosen_id",
               "rejected_id", "chosen_judgment_ids", "rejected_judgment_ids", "round"}


@pytest.fixture
def run(tmp_path):
    return build_fixture_run(tmp_path / "r")


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


def test_export_datasets_replaces_an_older_export(run, tmp_path):
    import datasets

    out = tmp_path / "ds"
    export_pairs(run, 3, out, "datasets")
    assert export_pairs(run, 2, out, "datasets") == 2
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
    assert counts == {"tasks": 2, "annotations": 2, "judgments": 6, "skipped_cancelled": 0, "skipped_existing": 0}
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
