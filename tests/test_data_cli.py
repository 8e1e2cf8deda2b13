"""`selfreward data import-oasst` and `data make-eft` through the CLI."""

import json

from click.testing import CliRunner

from selfreward.cli import cli
from selfreward.data import read_eft, read_ift
from selfreward.evaluation.judge_quality import load_eval_set


def tree(tree_id, text, replies, lang="en"):
    return {"message_tree_id": tree_id, "prompt": {
        "message_id": f"{tree_id}-p", "text": text, "role": "prompter", "lang": lang,
        "replies": [{"message_id": f"{tree_id}-r{k}", "text": t, "role": "assistant", "rank": rank, "lang": lang,
                     "replies": []} for k, (t, rank) in enumerate(replies)]}}


def test_import_then_make_eft(tmp_path):
    trees = tmp_path / "trees.jsonl"
    rows = [tree("t1", "How do tides work?", [("The moon pulls the oceans.", 0), ("Wind.", 1), ("Dunno", 2)]),
            tree("t2", "Name a prime number.", [("Seven is prime.", 0), ("Nine.", 1)]),
            tree("t3", "¿Qué hora es?", [("No sé.", 0)], lang="es")]
    trees.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "import-oasst", str(trees), "--out", str(tmp_path / "oasst")])
    assert result.exit_code == 0, result.output
    assert "kept 2" in result.output
    ift = read_ift(tmp_path / "oasst" / "ift.jsonl")
    assert {r["response"] for r in ift} == {"The moon pulls the oceans.", "Seven is prime."}
    assert len(load_eval_set(tmp_path / "oasst" / "eft_eval.jsonl")) == 2

    # The judge agrees with the humans on t1 (5 > 3 > 1) and disagrees on t2 (2 < 4).
    script = tmp_path / "judge.json"
    script.write_text(json.dumps(["Accurate and complete.\nScore: 5", "Vague.\nScore: 3", "Unhelpful.\nScore: 1",
                                  "Terse.\nScore: 2", "Wrong but confident.\nScore: 4"]))
    out = tmp_path / "eft.jsonl"
    made = runner.invoke(cli, ["data", "make-eft", str(tmp_path / "oasst" / "eft_eval.jsonl"), "--out", str(out),
                               "--judge", "scripted", "--judge-script", str(script), "--max-share", "1"])
    assert made.exit_code == 0, made.output
    eft = read_eft(out)
    assert [r["score"] for r in eft] == [5, 3, 1]
    assert all("Score:" not in r["justification"] for r in eft)
    assert "1 agree with humans, 1 disagree" in made.output


def test_import_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"message_tree_id": "x", "prompt": {"text": "hi"\n')
    result = CliRunner().invoke(cli, ["data", "import-oasst", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "bad.jsonl:1" in result.output
    assert not (tmp_path / "o" / "ift.jsonl").exists()


def test_outputs_inside_a_run_folder_are_refused(tmp_path):
    # `make-eft --out runs/demo/run.db` used to replace the run's database: these outputs take export's guard.
    from selfreward.config import resolve
    from selfreward.core.store import Run

    Run.create(tmp_path / "runs" / "demo", resolve({}, {"preset": "tiny"})).close()
    run_db = tmp_path / "runs" / "demo" / "run.db"
    before = run_db.read_bytes()
    trees = tmp_path / "trees.jsonl"
    trees.write_text(json.dumps(tree("t1", "How do tides work?", [("The moon.", 0), ("Wind.", 1)])) + "\n")
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text(json.dumps({"instruction": "Why?", "responses": [{"text": "a", "rank": 0},
                                                                         {"text": "b", "rank": 1}]}) + "\n")
    script = tmp_path / "judge.json"
    script.write_text(json.dumps(["Good.\nScore: 5", "Bad.\nScore: 1"]))
    for args in (["data", "make-eft", str(ranked), "--out", str(run_db), "--judge", "scripted",
                  "--judge-script", str(script), "--max-share", "1"],
                 ["data", "import-oasst", str(trees), "--out", str(tmp_path / "runs" / "demo")],
                 ["data", "import-oasst", str(trees), "--out", str(tmp_path / "runs" / "demo" / "models" / "x")],
                 ["report", "demo", "--runs-dir", str(tmp_path / "runs"), "--out",
                  str(tmp_path / "runs" / "demo" / "models")]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert "is inside the run folder" in result.output and len(result.output.strip().splitlines()) == 1
    assert run_db.read_bytes() == before
    assert {p.name for p in (tmp_path / "runs" / "demo").iterdir()} <= {".lock", "config.toml", "models", "run.db",
                                                                       "run.db-wal", "run.db-shm"}
    assert not any((tmp_path / "runs" / "demo" / "models").iterdir())
