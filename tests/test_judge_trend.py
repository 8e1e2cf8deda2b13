"""Judge quality measured in the loop: the bias panels of each round's eval stage, a ranked
--eft-eval file, and judge quality across rounds in status and the HTML report, with the
sentence that says when the newest judge got worse."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from selfreward.cli import cli
from selfreward.core.store import Run
from selfreward.inspection.trend import judge_trend, verdict


@pytest.fixture
def ranked(tmp_path):
    """Two prompts, each with three answers that humans ranked 0 (best) to 2."""
    rows = [{"instruction": f"Explain {w} briefly", "responses": [{"text": f"{w}: a clear, correct account.", "rank": 0},
                                                                  {"text": f"{w} is a thing.", "rank": 1},
                                                                  {"text": "No idea.", "rank": 2}]}
            for w in ("tides", "rust")]
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def both_script(tmp_path):
    """Outputs the additive and the pairwise parser both read: Score first, Verdict on the last line."""
    outputs = ["Clear.\nScore: 4\nVerdict: A", "Vague.\nScore: 2\nVerdict: A", "Good.\nScore: 5\nVerdict: B",
               "Fine.\nScore: 3\nVerdict: tie"]
    path = tmp_path / "judge.json"
    path.write_text(json.dumps(outputs))
    return path


def iterate(tmp_path, tiny_model, seed_files, ranked, name, *extra):
    args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", name, "--model", str(tiny_model),
            "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(ranked),
            "--preset", "tiny", "--rounds", "2", "--set", "eval_eft_size=0", *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Run.open(tmp_path / "runs" / name), result.output


def metrics(run: Run, model: str) -> dict:
    return {r["name"]: r["value"] for r in run.rows("select name, value from metrics where model = ?", [model])}


def test_eval_stage_stores_bias_panels_from_a_ranked_file(tmp_path, tiny_model, seed_files, ranked, both_script):
    run, output = iterate(tmp_path, tiny_model, seed_files, ranked, "s", "--judge", "scripted",
                          "--judge-script", str(both_script))
    m = metrics(run, "M1")
    assert m["eft_n_prompts"] == 2 and m["eft_n_responses"] == 6  # the ranked file, grouped
    # Position probe: per prompt, best-vs-worst asked as (best, worst) then (worst, best). The script starts
    # afresh for the probe: prompt 1 gets 'A' and 'A' (inconsistent), prompt 2 gets 'B' and 'tie' (inconsistent).
    assert m["bias_position_n"] == 2 and m["bias_position_inconsistency"] == 1.0
    assert "bias_position_accuracy" not in m  # no consistent verdict to be accurate with
    # Verbosity probe: (best, best + filler) per prompt scored 4 and 2, then 5 and 3: padding never won.
    assert m["bias_verbosity_n"] == 2 and m["bias_verbosity_padded_wins"] == 0.0
    assert "bias_selfpref_n" not in m  # self-preference is the self judge's question
    assert "judge quality" in output and "position inconsistency" in output  # iterate ends with the trend


def test_self_judge_answers_for_the_self_preference_probe(tmp_path, tiny_model, seed_files, ranked):
    run, _ = iterate(tmp_path, tiny_model, seed_files, ranked, "self", "--judge", "self")
    m = metrics(run, "M2")
    # The tiny random model's judgments do not parse: the probe ran (it answered both prompts) but scored nothing,
    # and says so with n = 0 rather than a made-up gap.
    assert m["bias_selfpref_n"] == 0 and "bias_selfpref_gap" not in m
    assert "bias_selfpref_human_accuracy" not in m  # nothing parsed: no accuracy, not 0%
    assert {"bias_position_n", "bias_verbosity_n"} <= set(m)


def test_bad_ranked_file_is_one_line_before_a_run_exists(tmp_path, tiny_model, seed_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "responses": [{"text": "only one", "rank": 0}]}) + "\n")
    result = CliRunner().invoke(cli, ["iterate", "--runs-dir", str(tmp_path / "runs"), "--model", str(tiny_model),
                                      "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
                                      "--eft-eval", str(bad), "--preset", "tiny"])
    assert result.exit_code != 0 and "at least 2 ranked responses" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_verdict_names_what_got_worse_past_its_margin():
    old = {"eft_pairwise_accuracy": 0.44, "eft_pairwise_ties": 0.19, "eft_spearman": 0.10}
    text, worse = verdict("M2", old, "M3", {"eft_pairwise_accuracy": 0.39 - 0.01, "eft_pairwise_ties": 0.25,
                                            "eft_spearman": 0.12})
    assert worse and text == "M3 judges worse than M2: pairwise accuracy 44% -> 38%, ties 19% -> 25%."
    text, worse = verdict("M2", old, "M3", {"eft_pairwise_accuracy": 0.60, "eft_pairwise_ties": 0.19})
    assert not worse and text.startswith("M3 judges better than M2: pairwise accuracy 44% -> 60%")
    text, worse = verdict("M2", old, "M3", {"eft_pairwise_accuracy": 0.46, "eft_pairwise_ties": 0.18})
    assert not worse and "about as well" in text


def put(run: Run, model: str, round_: int, values: dict) -> None:
    with run.db.atomic():
        run.db["metrics"].upsert_all([{"round": round_, "model": model, "name": k, "value": v}
                                      for k, v in values.items()], pk=("round", "model", "name"))


def test_status_and_report_show_quality_across_rounds(tmp_path, tiny_model, seed_files, ranked, both_script):
    run, _ = iterate(tmp_path, tiny_model, seed_files, ranked, "t", "--judge", "scripted",
                     "--judge-script", str(both_script))
    run.close()
    run = Run.open(tmp_path / "runs" / "t", writer=True)
    # M1 judged well, M2 worse: pairwise accuracy and ties moved past their margins.
    put(run, "M1", 1, {"eft_pairwise_accuracy": 0.70, "eft_pairwise_ties": 0.10})
    put(run, "M2", 2, {"eft_pairwise_accuracy": 0.40, "eft_pairwise_ties": 0.30})
    trend = judge_trend(run)
    assert trend["models"] == ["M0", "M1", "M2"] and trend["worse"]
    status = CliRunner().invoke(cli, ["status", str(run.path)])
    assert status.exit_code == 0
    assert "WARNING: M2 judges worse than M1: pairwise accuracy 70% -> 40%, ties 10% -> 30%" in status.output
    line = next(x for x in status.output.splitlines() if x.strip().startswith("pairwise accuracy "))
    assert line.split()[-2:] == ["70%", "40%"]
    from selfreward.inspection.report import build_report

    page = build_report(run, tmp_path / "report").read_text()
    assert "M2 judges worse than M1" in page and "<th>M2</th>" in page
    # And when M2 judges better, no warning.
    put(run, "M2", 2, {"eft_pairwise_accuracy": 0.80, "eft_pairwise_ties": 0.05})
    status = CliRunner().invoke(cli, ["status", str(run.path), "--json"])
    judge = json.loads(status.output)["judge"]
    assert not judge["worse"] and judge["verdict"].startswith("M2 judges better than M1")


def test_a_judge_whose_scores_never_parsed_has_no_accuracy_to_compare(tmp_path, tiny_model, seed_files, ranked,
                                                                        both_script):
    run, _ = iterate(tmp_path, tiny_model, seed_files, ranked, "z", "--judge", "scripted",
                     "--judge-script", str(both_script))
    run.close()
    run = Run.open(tmp_path / "runs" / "z", writer=True)
    put(run, "M1", 1, {"eft_parse_rate": 0.0, "eft_pairwise_accuracy": 0.0, "eft_pairwise_ties": 0.0})
    put(run, "M2", 2, {"eft_parse_rate": 0.9, "eft_pairwise_accuracy": 0.40, "eft_pairwise_ties": 0.20})
    trend = judge_trend(run)
    ties = next(r for r in trend["rows"] if r["metric"] == "ties")
    assert ties["M1"] == "-" and ties["M2"] == "20%"
    assert not trend["worse"] and trend["verdict"] == "M2 judges better than M1: parse rate 0% -> 90%."
