"""Judge-quality metrics (the paper's Table 4) and the eval commands."""

import json
import math

import pytest
from click.testing import CliRunner

from selfreward.cli import cli
from selfreward.evaluation.judge_quality import EvalGroup, load_eval_set, quality_metrics


def test_metrics_on_known_rankings():
    groups = [EvalGroup("q1", ["a", "b", "c"], [3.0, 2.0, 1.0]),   # humans: a > b > c
              EvalGroup("q2", ["d", "e"], [0.0, -1.0])]            # humans: d > e (ranks 0, 1)
    scores = [[5.0, 3.0, 3.0],   # agrees on (a,b), (a,c); ties (b,c)
              [1.0, 4.0]]        # disagrees
    m = quality_metrics(groups, scores)
    assert m["pairwise_accuracy"] == pytest.approx(2 / 4)
    assert m["pairwise_ties"] == pytest.approx(1 / 4)
    assert m["five_best"] == pytest.approx(1 / 2)      # a got 5; d did not
    assert m["exact_match"] == 0                        # the tie breaks q1's full ranking
    # q1: spearman of (5,3,3) vs (3,2,1) = 0.866; q2: -1. Kendall tau-b: 0.816 and -1.
    assert m["spearman"] == pytest.approx((0.8660254 - 1) / 2, abs=1e-6)
    assert m["kendall_tau"] == pytest.approx((0.8164966 - 1) / 2, abs=1e-6)
    assert m["parse_rate"] == 1.0


def test_unparsed_scores_count_in_parse_rate_not_as_zero():
    groups = [EvalGroup("q", ["a", "b"], [1.0, 0.0])]
    m = quality_metrics(groups, [[None, 2.0]])
    assert m["parse_rate"] == 0.5
    assert m["pairwise_accuracy"] == 0 and m["pairwise_ties"] == 0
    assert math.isnan(m["spearman"])


def test_ranked_eval_set_reader(tmp_path):
    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps({"instruction": "q", "responses": [{"text": "x", "rank": 1},
                                                                  {"text": "y", "rank": 0}]}) + "\n")
    (g,) = load_eval_set(path)
    assert g.preference == [-1.0, -0.0]
    path.write_text(json.dumps({"instruction": "q", "responses": [{"text": "x", "rank": 0}]}) + "\n")
    from selfreward.errors import SelfRewardError

    with pytest.raises(SelfRewardError, match="at least 2"):
        load_eval_set(path)


@pytest.fixture
def ranked(tmp_path):
    path = tmp_path / "ranked.jsonl"
    rows = [{"instruction": f"Explain {w}", "responses": [{"text": f"{w} is a thing {k}", "rank": k}
                                                           for k in range(3)]} for w in ("tides", "rust")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_judge_cli_self_and_scripted(judged_run, judge_script, seed_files, ranked):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", "judge", str(judged_run.path), "--models", "M0,M1", "--json", "--judge", "self",
                                 "--data", str(seed_files["eft"])])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["model"] for r in rows] == ["M0", "M1"]
    assert all(r["judge"] == f"self:{r['model']}" and r["judgments_per_s"] > 0 for r in rows)

    scripted = runner.invoke(cli, ["eval", "judge", str(judged_run.path), "--judge", "scripted", "--judge-script",
                                   str(judge_script), "--data", str(ranked)])
    assert scripted.exit_code == 0, scripted.output
    assert "pair acc" in scripted.output and "scripted" in scripted.output
    stored = judged_run.rows("select distinct eval_id, judge from eval_metrics where kind = 'judge'")
    assert len(stored) == 3
    names = {r["name"] for r in judged_run.rows("select name from eval_metrics")}
    assert {"parse_rate", "pairwise_accuracy", "pairwise_ties", "judgments_per_s", "verbosity_n"} <= names

    missing = runner.invoke(cli, ["eval", "judge", str(judged_run.path), "--models", "M9"])
    assert missing.exit_code != 0 and "model M9 is not in run" in missing.output


def test_head2head_cli(judged_run, judge_script, seed_files):
    result = CliRunner().invoke(cli, ["eval", "head2head", str(judged_run.path), "--a", "M1", "--b", "M2",
                                      "--prompts", str(seed_files["ift"]), "--limit", "4", "--json",
                                      "--judge", "scripted", "--judge-script", str(judge_script)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 4
    assert summary["wins"] + summary["ties"] + summary["losses"] + summary["unscored"] == 4
    assert summary["a_mean_tokens"] >= 0
    # the length-controlled win rate as AlpacaEval 2 fits it needs five scored prompts (5-fold CV): NaN under that
    assert summary["win_lo"] <= summary["win_hi"] and math.isnan(summary["win_lc"])
    rows = judged_run.rows("select * from head2head where eval_id = ?", [summary["eval_id"]])
    assert len(rows) == 4 and {r["a_model"] for r in rows} == {"M1"}
