"""End to end through the real CLI: a tiny model built in a fixture, a scripted judge,
assertions on the rows in run.db."""

import json

import pytest
import sqlite_utils
from click.testing import CliRunner

from selfreward.cli import cli
from selfreward.inspection.status import terminal_safe


def iterate(tmp_path, tiny_model, seed_files, judge_script, *extra):
    args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "t", "--model", str(tiny_model),
            "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(seed_files["eft"]),
            "--preset", "tiny", "--judge", "scripted", "--judge-script", str(judge_script),
            "--set", "prompts_per_round=3", "--set", "n_candidates=3", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture
def two_rounds(tmp_path, tiny_model, seed_files, judge_script):
    result = iterate(tmp_path, tiny_model, seed_files, judge_script, "--rounds", "2")
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "t", result


def test_iterate_two_rounds_fills_the_store(two_rounds):
    path, result = two_rounds
    db = sqlite_utils.Database(path / "run.db")
    assert [r["round"] for r in db["rounds"].rows if r["finished_at"]] == [1, 2]
    assert {m["name"]: m["kind"] for m in db["models"].rows}["M1"] == "sft-lora"
    assert (path / "models" / "M1" / "adapter" / "adapter_config.json").is_file()
    # Stored relative to the run folder, so the run can be moved or used from any directory.
    stored = {m["name"]: m["path"] for m in db["models"].rows}
    assert stored["M1"] == "models/M1" and stored["M2"].startswith("models/")
    from selfreward.core.store import Run

    assert Run.open(path).model("M1")["path"] == str((path / "models" / "M1").resolve())

    prompts = list(db["prompts"].rows_where("round = 2"))
    assert prompts and all(p["source"] == "self_instruct:M1" for p in prompts)
    candidates = list(db["candidates"].rows_where("round = 2"))
    assert len(candidates) == 3 * len(prompts)
    judgments = list(db["judgments"].rows_where("round = 2"))
    assert len(judgments) == 2 * len(candidates)  # tiny preset: 2 judge samples each
    # Failures are NULL with a reason and the raw text kept; never a made-up 0.
    failed = [j for j in judgments if j["score"] is None]
    assert failed and all(j["reason"] and j["raw"] for j in failed)
    assert all(j["reason"] is None and 0 <= j["score"] <= 5 for j in judgments if j["score"] is not None)
    assert {j["raw"] for j in failed} <= {"I cannot decide.", "Score: 7"}

    pairs = list(db["pairs"].rows_where("round = 2"))
    assert len(pairs) == len(prompts)
    kept = [p for p in pairs if p["status"] == "kept"]
    for p in kept:
        assert p["chosen_score"] > p["rejected_score"]
    m2 = {m["name"]: m for m in db["models"].rows}["M2"]
    if kept:
        assert m2["kind"] == "dpo-lora"
        assert db["training_steps"].count_where("round = 2 and kind = 'dpo'") > 0
    else:
        assert m2["kind"] == "copy"
    stages = {(s["round"], s["stage"]) for s in db["stages"].rows}
    assert {(1, "eval_M0"), (1, "actor_M0"), (1, "sft"), (1, "eval_M1"), (1, "actor_M1"), (2, "self_instruct"),
            (2, "candidates"), (2, "judge"), (2, "pairs"), (2, "dpo"), (2, "eval_M2"), (2, "actor_M2")} == stages
    assert "M1->M2" in result.output  # the closing summary


def test_rerun_says_nothing_to_do_and_adds_nothing(two_rounds, tmp_path, tiny_model, seed_files, judge_script):
    path, _ = two_rounds
    db = sqlite_utils.Database(path / "run.db")
    counts = {t: db[t].count for t in ("prompts", "candidates", "judgments", "pairs", "stages")}
    result = iterate(tmp_path, tiny_model, seed_files, judge_script, "--rounds", "2")
    assert result.exit_code == 0
    assert "nothing to do" in result.output
    assert counts == {t: db[t].count for t in counts}


def test_resume_after_a_crash_repeats_nothing(tmp_path, tiny_model, seed_files, judge_script, monkeypatch):
    from selfreward.core.stages import pairs

    def crash(ctx, t):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during pair building

    monkeypatch.setattr(pairs, "run", crash)
    result = iterate(tmp_path, tiny_model, seed_files, judge_script, "--rounds", "2")
    assert result.exit_code == 130
    db = sqlite_utils.Database(tmp_path / "runs" / "t" / "run.db")
    done = {s["stage"] for s in db["stages"].rows_where("round = 2")}
    assert done == {"self_instruct", "candidates", "judge"}
    judged = db["judgments"].count

    monkeypatch.undo()
    result = iterate(tmp_path, tiny_model, seed_files, judge_script, "--rounds", "2")
    assert result.exit_code == 0, result.output
    assert db["judgments"].count == judged  # the judge stage was not run again
    assert {s["stage"] for s in db["stages"].rows_where("round = 2")} >= {"pairs", "dpo"}


def test_status_and_show(two_rounds):
    path, _ = two_rounds
    runner = CliRunner()
    status = runner.invoke(cli, ["status", str(path), "--stages"])
    assert status.exit_code == 0, status.output
    assert "parse%" in status.output and "M1->M2" in status.output and "judge" in status.output
    as_json = json.loads(runner.invoke(cli, ["status", str(path), "--json"]).output)
    r2 = as_json["rounds"][1]
    assert r2["judgments"] > 0 and r2["pairs_kept"] + r2["dropped_tie"] + r2["dropped_unscored"] == r2["prompts"]

    db = sqlite_utils.Database(path / "run.db")
    prompt = next(db["prompts"].rows_where("round = 2"))
    show = runner.invoke(cli, ["show", str(path), str(prompt["id"])])
    assert show.exit_code == 0, show.output
    assert terminal_safe(prompt["text"])[:20] in show.output.replace("\n    ", " ")  # control characters escaped
    assert "judge sample 0 [scripted]" in show.output
    missing = runner.invoke(cli, ["show", str(path), "99999"])
    assert missing.exit_code != 0 and "no prompt with id 99999" in missing.output


def test_resume_refuses_a_changed_config(two_rounds, tmp_path, tiny_model, seed_files, judge_script):
    result = iterate(tmp_path, tiny_model, seed_files, judge_script, "--rounds", "3", "--seed", "5")
    assert result.exit_code != 0
    assert "was made with seed=0, not 5" in result.output


def test_two_runs_in_different_folders_produce_the_same_rows(tmp_path, tiny_model, seed_files, judge_script):
    # Seeds come from the run seed, the stage and the prompt text, never from where the run lives.
    a = iterate(tmp_path / "a", tiny_model, seed_files, judge_script, "--rounds", "2")
    b = iterate(tmp_path / "b", tiny_model, seed_files, judge_script, "--rounds", "2")
    assert a.exit_code == 0 and b.exit_code == 0
    dbs = [sqlite_utils.Database(tmp_path / x / "runs" / "t" / "run.db") for x in ("a", "b")]
    for sql in ("select text from prompts order by id", "select text from candidates order by id",
                "select raw, score from judgments order by id", "select status, chosen_id, rejected_id from pairs"):
        assert dbs[0].execute(sql).fetchall() == dbs[1].execute(sql).fetchall(), sql


def test_the_stage_table_writes_its_free_text_last_column_unpadded():
    from selfreward.inspection.status import table

    rows = [{"stage": "a", "detail": "x" * 50}, {"stage": "bb", "detail": "y"}]
    lines = table(rows, [("stage", "stage"), ("detail", "detail")], free_last=True).splitlines()
    assert lines == ["stage  detail", "-----  ------", "    a  " + "x" * 50, "   bb  y"]
