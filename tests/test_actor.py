"""The actor measured every round on yardsticks it never trained on: verifiable instructions
checked by the IFEval checkers, win rates by an independent judge on 127.0.0.1, and the
promotion gate that keeps a regressing model out of the next round."""

import collections
import json
import re
import sqlite3

from click.testing import CliRunner
from test_api_judge import ScriptedServer

from selfreward.backends.judges import Comparison, GroupResult, Verdict
from selfreward.cli import cli
from selfreward.core.store import Run
from selfreward.evaluation.actor import paired_difference, prefer
from selfreward.prompts import Parsed


def loop_args(tmp_path, tiny_model, seed_files, judge_script, *extra, rounds=2, name="a"):
    return ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", name, "--model", str(tiny_model),
            "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(seed_files["eft"]),
            "--preset", "tiny", "--judge", "scripted", "--judge-script", str(judge_script), "--rounds", str(rounds),
            *extra]


def test_every_model_is_checked_on_verifiable_instructions_and_status_shows_it(tmp_path, tiny_model, seed_files,
                                                                              judge_script):
    result = CliRunner().invoke(cli, loop_args(tmp_path, tiny_model, seed_files, judge_script, "--set",
                                               "report_to=tensorboard"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "actor quality" in result.output and "IF prompt strict" in result.output
    run = Run.open(tmp_path / "runs" / "a")
    answers = run.rows("select * from eval_answers where dataset = 'if' order by id")
    assert sorted({a["model"] for a in answers}) == ["M0", "M1", "M2"]
    assert len(answers) == 3 * 4  # the tiny preset's if_eval_size
    checks = run.rows("select c.* from if_checks c join eval_answers a on a.id = c.answer_id where a.model='M2'")
    ids = {c["instruction_id"] for c in checks}
    assert ids and all(":" in i for i in ids)
    for c in checks:  # each constraint passed, failed, or unchecked with its reason: never two of these
        assert (c["strict"] is None) == (c["unchecked"] is not None)
    metrics = {r["name"]: r["value"] for r in run.rows("select name, value from metrics where model = 'M2'")}
    for name in ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose", "if_checked",
                 "if_unchecked", "if_floor"):
        assert name in metrics, name
    assert metrics["if_checked"] + metrics["if_unchecked"] == 4
    # promote=always: every model after round 1 is promoted, and said so
    assert run.rows("select round, promoted, reason from promotions") == [
        {"round": 2, "promoted": 1, "reason": "promote=always"}]
    # the tables are evidence: append-only
    with sqlite3.connect(run.path / "run.db") as raw:
        for table in ("eval_answers", "if_checks", "promotions"):
            try:
                raw.execute(f"delete from {table}")
                raise AssertionError(f"{table} accepted a DELETE")
            except sqlite3.IntegrityError:
                pass
    status = CliRunner().invoke(cli, ["status", "a", "--runs-dir", str(tmp_path / "runs")])
    assert status.exit_code == 0
    assert re.search(r"actor quality\s+M0\s+M1\s+M2", status.output)
    # report_to: each round's metrics reach the tracker, the round as the step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path / "tensorboard" / "a-eval")).Reload()
    assert [e.step for e in events.Scalars("eval/if_prompt_strict")] == [1, 1, 2]  # M0 and M1 (round 1), M2
    as_json = json.loads(CliRunner().invoke(cli, ["status", "a", "--runs-dir", str(tmp_path / "runs"),
                                                  "--json"]).output)
    assert as_json["actor"]["models"] == ["M0", "M1", "M2"]

    # eval instruct: a malformed line is one error naming the file and line, before any model loads
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], '
                   '"kwargs": [{}]}\n{"key": 2, "prompt": "Say hi."}\n')
    out = CliRunner().invoke(cli, ["eval", "instruct", "a", "--runs-dir", str(tmp_path / "runs"), "--data", str(bad)])
    assert out.exit_code == 1 and f"{bad}:2:" in out.output and "Traceback" not in out.output
    assert run.db["eval_metrics"].count == 0
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().splitlines()[0] + "\n")
    out = CliRunner().invoke(cli, ["eval", "instruct", "a", "--runs-dir", str(tmp_path / "runs"), "--data", str(good),
                                   "--models", "M2", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["if_checked"] == 1
    stored = run.rows("select a.dataset, c.instruction_id, c.strict from eval_answers a join if_checks c "
                      "on c.answer_id = a.id where a.dataset like 'if:%'")
    assert len(stored) == 1 and stored[0]["instruction_id"] == "punctuation:no_comma" and stored[0]["strict"] in (0, 1)
    assert {r["name"] for r in run.rows("select name from eval_metrics where kind = 'instruct'")} >= {
        "if_prompt_strict", "if_checked", "if_floor"}


def prefer_baseline(db_path):
    """A scripted independent judge on 127.0.0.1 that always finds M1's answer better, whichever side
    it is shown on: against M1, every later model regresses. Where both answers read the same (the
    tiny model's greedy answers often do), it names the side M1 is on by the order of asking: the
    judge asks each prompt A-first and then B-first, one request at a time (api_concurrency=1)."""
    seen = collections.Counter()

    def answer(body):
        prompt = body["messages"][-1]["content"]
        a = prompt.split("<response_a>")[1].split("</response_a>")[0]
        b = prompt.split("<response_b>")[1].split("</response_b>")[0]
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            m1 = {r[0] for r in db.execute("select text from eval_answers where model='M1' and dataset='win'")}
        if a == b:
            seen[prompt] += 1
            verdict = "B" if seen[prompt] % 2 else "A"  # the baseline is B in the first order, A in the second
        else:
            verdict = "tie" if (a in m1) == (b in m1) else "A" if a in m1 else "B"
        return {"content": f"One of them is closer to the question.\nVerdict: {verdict}"}

    return answer


def test_a_regressing_model_is_not_promoted_and_the_loop_stops_after_its_patience(tmp_path, tiny_model, seed_files,
                                                                                   judge_script):
    runs = tmp_path / "runs"
    with ScriptedServer([], answer=prefer_baseline(runs / "g" / "run.db")) as srv:
        result = CliRunner().invoke(cli, loop_args(
            tmp_path, tiny_model, seed_files, judge_script, "--set", "eval_judge=api", "--api-base", srv.url,
            "--api-model", "grader", "--set", "promote=no-regress", "--set", "promote_metric=win_vs_prev",
            "--set", "promote_patience=2", "--set", "api_concurrency=1", "--set", "win_eval_size=6", rounds=4,
            name="g"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "not promoted" in result.output
    assert "the loop stopped after round 3: 2 model(s) in a row not promoted" in result.output
    run = Run.open(runs / "g")
    gates = run.rows("select round, model, promoted, parent, metric, value, hi, reason from promotions order by round")
    assert [(g["round"], g["promoted"], g["parent"]) for g in gates] == [(2, 0, "M1"), (3, 0, "M1")]
    assert gates[0]["metric"] == "win_vs_prev" and gates[0]["hi"] < 0.5
    # round 3 trained M3 from M1, not from the rejected M2; round 4 never started
    assert run.rows("select round, model_in from rounds order by round") == [
        {"round": 1, "model_in": "M0"}, {"round": 2, "model_in": "M1"}, {"round": 3, "model_in": "M1"}]
    assert run.model("M3")["parent"] == "M1"
    assert run.rows("select distinct model from candidates where round = 3") == [{"model": "M1"}]
    comparisons = run.rows("select * from eval_comparisons where model = 'M2'")
    assert comparisons and all(c["judge"].startswith("api:grader") and "Verdict" in c["ab_raw"] and "Verdict" in c["ba_raw"]
                               for c in comparisons)
    metrics = {r["name"]: r["value"] for r in run.rows("select name, value from metrics where model = 'M2'")}
    assert metrics["win_vs_prev"] == metrics["win_vs_m1"] < 0.5
    assert "win_lc_vs_prev" in metrics
    status = CliRunner().invoke(cli, ["status", "g", "--runs-dir", str(runs)])
    assert "M2: not promoted: win_vs_prev of M2 against M1" in status.output
    assert re.search(r"promoted\s+-\s+-\s+NO\s+NO", status.output)
    # verify re-reads every comparison's judge texts; a forged preference is caught
    ok = CliRunner().invoke(cli, ["verify", "g", "--runs-dir", str(runs)])
    assert ok.exit_code == 0, ok.output
    first = comparisons[0]
    with sqlite3.connect(runs / "g" / "run.db") as raw:
        raw.execute("insert into eval_comparisons (round, model, baseline, answer_id, baseline_answer_id, judge, "
                    "preference, outcome, ab_score, ba_score, ab_raw, ba_raw, template_sha) "
                    "values (2, 'M2', 'M1', ?, ?, ?, 1.0, 'a', 1.0, 0.0, ?, ?, ?)",
                    [first["answer_id"], first["baseline_answer_id"], first["judge"], first["ab_raw"],
                     first["ba_raw"], first["template_sha"]])
    forged = CliRunner().invoke(cli, ["verify", "g", "--runs-dir", str(runs)])
    assert forged.exit_code == 1 and "eval comparison" in forged.output
    # a rerun does not go past the gate's stop either
    again = CliRunner().invoke(cli, loop_args(tmp_path, tiny_model, seed_files, judge_script, rounds=4, name="g"),
                               catch_exceptions=False)
    assert "the loop stopped after round 3" in again.output


def verdict(raw: str) -> Verdict:
    return Verdict(raw, Parsed(None, raw, None))


def test_a_pairwise_preference_keeps_disagreeing_orders_apart_as_a_tie():
    ab, ba = verdict("Verdict: A"), verdict("Verdict: A")
    for outcome, value in (("a", 1.0), ("b", 0.0), ("tie", 0.5), ("inconsistent", 0.5), ("unparsed", None)):
        p = prefer(GroupResult([[ab], [ba]], [Comparison(0, 1, 0, outcome, ab, ba)]))
        assert p["preference"] == value and p["ab_raw"] == "Verdict: A"
        assert p["outcome"] == (outcome if value is not None else "unscored")
    scored = GroupResult([[Verdict(None, Parsed(0.9, "", None))], [Verdict(None, Parsed(0.2, "", None))]])
    assert prefer(scored)["preference"] == 1.0
    unscored = GroupResult([[Verdict(None, Parsed(None, "", "x"))], [Verdict(None, Parsed(0.2, "", None))]])
    assert prefer(unscored)["preference"] is None


def test_the_paired_bootstrap_interval_brackets_the_difference():
    d = paired_difference([1, 1, 1, 0] * 10, [0, 0, 1, 0] * 10, seed=0)
    assert d["diff"] == 0.5 and d["lo"] < 0.5 < d["hi"] and d["lo"] > 0
    same = paired_difference([1, 0] * 10, [1, 0] * 10)
    assert same["diff"] == same["lo"] == same["hi"] == 0


def test_a_reward_model_as_the_eval_judge(tmp_path, tiny_model, seed_files, judge_script):
    from test_reward_model import write_classifier

    rm = write_classifier(tiny_model, tmp_path / "rm", num_labels=1)
    result = CliRunner().invoke(cli, loop_args(tmp_path, tiny_model, seed_files, judge_script, "--set",
                                               "eval_judge=reward-model", "--set", f"eval_judge_model={rm}",
                                               "--set", "win_eval_size=6", name="rm"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = Run.open(tmp_path / "runs" / "rm")
    rows = run.rows("select * from eval_comparisons")
    assert len(rows) == 6 and all(r["judge"] == f"reward-model:{rm}" and r["ab_raw"] is None for r in rows)
    for r in rows:  # a scorer: the higher score wins
        assert r["preference"] == (1.0 if r["ab_score"] > r["ba_score"] else 0.0 if r["ab_score"] < r["ba_score"]
                                   else 0.5)
    metrics = {m["name"]: m["value"] for m in run.rows("select name, value from metrics where model = 'M2'")}
    assert metrics["win_vs_prev"] == sum(r["preference"] for r in rows) / 6
    assert metrics["win_vs_prev_lo"] <= metrics["win_vs_prev"] <= metrics["win_vs_prev_hi"]
    ok = CliRunner().invoke(cli, ["verify", "rm", "--runs-dir", str(tmp_path / "runs")])
    assert ok.exit_code == 0 and "6 eval-judge comparisons" in ok.output, ok.output


def test_the_gate_reads_verifiable_instructions_as_a_paired_difference(tmp_path):
    """promote=no-regress on if_prompt_strict: M2 failing prompts M1 passed is kept out; a difference whose
    interval reaches 0 is not; prompts unchecked for either model do not count."""
    import dataclasses

    from selfreward.backends.engines import Completion
    from selfreward.config import resolve
    from selfreward.evaluation import instruct
    from selfreward.evaluation.actor import answer_row, gate, store

    cfg = dataclasses.replace(resolve({}, {"preset": "tiny"}), promote="no-regress")
    items = [{"key": str(k), "prompt": "Answer without commas.", "instruction_id_list": ["punctuation:no_comma"],
              "kwargs": [{}]} for k in range(20)]
    run = Run.create(tmp_path / "r", cfg)

    def answers(model: str, commas: set[int]) -> None:
        rows = []
        for k, item in enumerate(items):
            text = "one, two" if k in commas else "one two"
            result = instruct.check(item, text) if k != 19 else instruct.unchecked(item, "no answer: test")
            rows.append((answer_row(1, model, "if", item["key"], item["prompt"], Completion(text, 2, "stop"), "t"),
                         (item, result)))
        with run.db.atomic():
            store(run.db, rows)

    answers("M1", commas=set())
    answers("M2", commas=set(range(12)))          # 12 of 19 checked prompts regress
    answers("M3", commas={0})                     # one prompt: within noise
    worse = gate(run, cfg, 2, "M2", "M1", {})
    assert worse["promoted"] == 0 and worse["hi"] < 0 and "the next round trains from M1" in worse["reason"]
    assert worse["value"] == -12 / 19  # the unchecked prompt counts for neither model
    same = gate(run, cfg, 3, "M3", "M1", {})
    assert same["promoted"] == 1 and same["lo"] < 0 <= same["hi"]
    assert gate(run, dataclasses.replace(cfg, promote="always"), 2, "M2", "M1", {})["promoted"] == 1
