"""Meta-Rewarding (the judge's own preference pairs) and CREAM (consistency across rounds):
the pure rules, CREAM's loss in TRL's trainer, and both through the real CLI loop on the
tiny fixture with a scripted judge."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import sqlite_utils
from click.testing import CliRunner

from selfreward.cli import cli
from selfreward.config import resolve
from selfreward.core.stages.consistency import consistency_by_prompt
from selfreward.core.stages.meta import elo, judge_pair, pick_candidates
from selfreward.training.recipes import preference
from selfreward.core.store import Run


def test_pick_candidates_takes_the_widest_spread_per_prompt():
    js = [{"candidate_id": c, "prompt_id": p, "score": s, "raw": f"Score: {s}"}
          for c, p, scores in ((1, 10, [4, 4, 4]), (2, 10, [1, 5, 3]), (3, 10, [2, 3, 2]),
                               (4, 20, [3, 3]), (5, 20, [None, 2]), (6, 30, [None, None]))
          for s in scores]
    chosen, skipped = pick_candidates(js)
    assert chosen == [2]  # prompt 10: [1, 5, 3] varies most
    assert skipped == {20: "no-spread", 30: "too-few"}
    assert pick_candidates(js + [{"candidate_id": 7, "prompt_id": 40, "score": s, "raw": "x"} for s in (1, 2)],
                           limit=1)[1][40] == "over meta_max_prompts"


def test_elo_ranks_by_battles_and_ignores_their_order():
    battles = [(1, 2, 1.0), (2, 1, 0.0), (1, 3, 1.0), (3, 1, 0.0), (2, 3, 0.5), (3, 2, 0.5)]
    ratings = elo([1, 2, 3], battles)
    assert ratings[1] > ratings[2] == pytest.approx(ratings[3])
    assert elo([1, 2, 3], list(reversed(battles))) == pytest.approx(ratings)
    assert all(math.isfinite(r) for r in elo([1, 2], [(1, 2, 1.0)] * 5).values())  # unbeaten stays finite


def test_judge_pair_statuses():
    metas = [{"a_id": 1, "b_id": 2, "winner": "a"}, {"a_id": 2, "b_id": 1, "winner": "b"}]
    assert judge_pair(9, [1, 2], metas)[("chosen_id")] == 1
    assert judge_pair(9, [1, 2], metas)["rejected_id"] == 2
    assert judge_pair(9, [1, 2], [{"a_id": 1, "b_id": 2, "winner": "tie"}])["status"] == "tie"
    assert judge_pair(9, [1, 2], [{"a_id": 1, "b_id": 2, "winner": None}])["status"] == "unjudged"


def test_consistency_is_kendall_tau_mapped_to_0_1():
    cands = [{"id": i, "prompt_id": 1 if i <= 3 else 2} for i in range(1, 7)]
    current = [{"candidate_id": i, "score": s} for i, s in ((1, 5), (2, 3), (3, 1), (4, 4), (5, 2), (6, 2))]
    agree = [{"candidate_id": i, "score": s} for i, s in ((1, 4), (2, 2), (3, 0), (4, 1), (5, 3), (6, 3))]
    c = consistency_by_prompt(cands, current, agree)
    assert c[1] == 1.0 and c[2] < 0.5  # prompt 1 ordered alike, prompt 2 reversed
    flat = [{"candidate_id": i, "score": 3} for i in range(1, 7)]
    assert consistency_by_prompt(cands, current, flat) == {1: None, 2: None}  # no order: plain DPO


PAIRS = [{"prompt": f"say {w}", "chosen": f"{w} answer good", "rejected": "bad bad bad"} for w in ("water", "city")]


def first_loss(tiny_model, tmp_path, name, pairs):
    cfg = resolve({}, {"preset": "tiny", "dpo_epochs": 1.0, "dpo_batch_size": 2, "micro_batch_size": 2,
                       "dpo_learning_rate": 1e-9, "dpo_learning_rate_end": 1e-9, "eft_eval": ""})
    rows, _, _ = preference(str(tiny_model), pairs, cfg, tmp_path / "runs" / name / "models" / "M2", round=2)
    return rows[0]["loss"]


def test_cream_loss_is_c_dpo_plus_1_minus_c_swapped_dpo(tiny_model, tmp_path):
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS]
    plain = first_loss(tiny_model, tmp_path, "plain", PAIRS)
    reverse = first_loss(tiny_model, tmp_path, "reverse", swapped)
    assert first_loss(tiny_model, tmp_path, "c1", [{**p, "consistency": 1.0} for p in PAIRS]) == pytest.approx(plain)
    assert first_loss(tiny_model, tmp_path, "c0", [{**p, "consistency": 0.0} for p in PAIRS]) == pytest.approx(reverse)
    mixed = first_loss(tiny_model, tmp_path, "mixed", [{**PAIRS[0], "consistency": 0.25},
                                                         {**PAIRS[1], "consistency": None}])
    # Pair 0: 0.25 * DPO + 0.75 * swapped; pair 1 (no C): plain DPO. The first step's losses are the
    # per-pair losses at the starting weights (adapter B = 0), so they add up by pair.
    one = [first_loss(tiny_model, tmp_path, f"p{i}", [p]) for i, p in enumerate(PAIRS)]
    one_swapped = [first_loss(tiny_model, tmp_path, f"s{i}", [p]) for i, p in enumerate(swapped)]
    assert mixed == pytest.approx((0.25 * one[0] + 0.75 * one_swapped[0] + one[1]) / 2, rel=1e-4)


@pytest.fixture
def meta_script(tmp_path):
    """Judgments that disagree, and meta-verdicts, in one cycled script (each call starts afresh)."""
    outputs = ["Accurate and complete. Score: 4", "Misses the point. Score: 1", "Verdict: A",
               "Partly right.\nScore: 3", "Verdict: B", "Same quality. Verdict: tie", "Good. Score: 5"]
    path = tmp_path / "judge.json"
    path.write_text(json.dumps(outputs))
    return path


def loop(tmp_path, tiny_model, seed_files, script, name, *sets):
    runs = tmp_path / "runs"
    args = ["iterate", "--runs-dir", str(runs), "--name", name, "--model", str(tiny_model), "--ift",
            str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "", "--preset", "tiny",
            "--judge", "scripted", "--judge-script", str(script), "--rounds", "3",
            "--set", "prompts_per_round=3", "--set", "n_candidates=3", "--set", "judge_samples=3"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return runs / name


def test_meta_rewarding_through_the_loop(tmp_path, tiny_model, seed_files, meta_script):
    path = loop(tmp_path, tiny_model, seed_files, meta_script, "meta", "meta_rewarding=yes")
    run = Run.open(path)
    metas = run.rows("select * from meta_judgments")
    assert metas and {m["order"] for m in metas} == {"ab", "ba"}
    assert all(m["raw"] and (m["winner"] in ("a", "b", "tie") or m["reason"]) for m in metas)
    kept = run.rows("select * from judge_pairs where status = 'kept'")
    assert kept and all(p["chosen_elo"] > p["rejected_elo"] for p in kept)
    # Chosen and rejected are judgments of that candidate, both of which parsed.
    for p in kept:
        both = run.rows("select candidate_id, score from judgments where id in (?, ?)", [p["chosen_id"], p["rejected_id"]])
        assert {b["candidate_id"] for b in both} == {p["candidate_id"]} and all(b["score"] is not None for b in both)
    for t in (2, 3):
        dpo = json.loads(run.db.execute("select detail from stages where round=? and stage='dpo'", [t]).fetchone()[0])
        kept_t = run.db.execute("select count(*) from judge_pairs where round=? and status='kept'", [t]).fetchone()[0]
        assert dpo["judge_pairs"] == kept_t
        meta = json.loads(run.db.execute("select detail from stages where round=? and stage='meta'", [t]).fetchone()[0])
        assert meta["meta_judgments"] == len([m for m in metas if m["round"] == t])
    # Append-only, verified, and shown to auditors.
    with pytest.raises(Exception, match="append-only"):
        sqlite3.connect(path / "run.db").execute("update meta_judgments set winner = 'a'")
    runner = CliRunner()
    assert runner.invoke(cli, ["verify", str(path)]).exit_code == 0
    shown = runner.invoke(cli, ["show", str(path), str(run.rows("select c.prompt_id from judge_pairs x join candidates c "
                                                               "on c.id = x.candidate_id limit 1")[0]["prompt_id"])])
    assert shown.exit_code == 0 and "meta-judge" in shown.output
    listed = runner.invoke(cli, ["rationales", str(path), "--meta", "--format", "jsonl"])
    assert listed.exit_code == 0 and len(listed.output.strip().splitlines()) == len(metas)
    from selfreward.inspection.report import build_report

    page = build_report(run, tmp_path / "report").read_text()
    section = page[page.index("own training"):]
    assert "judge pairs" in section
    row2 = section[section.index("<tr><td>2</td>"):].split("</tr>")[0]
    meta2 = json.loads(run.db.execute("select detail from stages where round=2 and stage='meta'").fetchone()[0])
    assert f"<td>{meta2['meta_judgments']}</td>" in row2 and f"<td>{meta2['judge_pairs']}</td>" in row2
    # A tampered meta-verdict is caught (the triggers are dropped the way an editor of the file could).
    db = sqlite_utils.Database(path / "run.db")
    db.execute("drop trigger meta_judgments_no_update")
    db.execute("update meta_judgments set winner = case winner when 'a' then 'b' else 'a' end where id = ?",
               [metas[0]["id"]])
    db.conn.commit()
    bad = runner.invoke(cli, ["verify", str(path)])
    assert bad.exit_code != 0 and f"meta-judgment {metas[0]['id']}" in bad.output


def test_cream_through_the_loop(tmp_path, tiny_model, seed_files, meta_script):
    path = loop(tmp_path, tiny_model, seed_files, meta_script, "cream", "consistency=yes")
    run = Run.open(path)
    for t in (2, 3):
        prior = run.rows("select * from consistency_judgments where round = ?", [t])
        assert prior and {p["judge"] for p in prior} == {"scripted"}
    kept = run.rows("select * from pairs where status = 'kept'")
    assert kept and any(p["consistency"] is not None for p in kept)
    assert all(p["consistency"] is None or 0 <= p["consistency"] <= 1 for p in kept)
    detail = json.loads(run.db.execute("select detail from stages where round=3 and stage='pairs'").fetchone()[0])
    assert "consistency" in detail and detail["consistency"]["n"] >= 1
    assert run.db.execute("select detail from models where name='M3'").fetchone()[0].count("cream")
    assert CliRunner().invoke(cli, ["verify", str(path)]).exit_code == 0


def test_meta_and_cream_need_a_self_judge(tmp_path, tiny_model, seed_files):
    for setting, message in (("meta_rewarding=yes", "meta_rewarding needs the self judge"),
                             ("consistency=yes", "consistency (CREAM) needs the self judge")):
        result = CliRunner().invoke(cli, ["iterate", "--runs-dir", str(tmp_path / "runs"), "--model", str(tiny_model),
                                          "--preset", "tiny", "--judge", "pairrm", "--set", setting])
        assert result.exit_code != 0 and message in result.output


def test_forced_verdict_from_probabilities_where_no_verdict_was_written(tiny_model):
    """A meta-judge that wrote no Verdict line gets its forced choice: P(A) and P(B) after its own
    text and 'Verdict: ', one forward pass; the battle counts A's normalised share of a win."""
    from selfreward.backends.engines.hf import TransformersEngine
    from selfreward.core.stages.meta import forced_verdicts, share_of_a

    prompts = [[{"role": "user", "content": f"Which judgment is better? {k}"}] for k in range(3)]
    rows = [{"a_id": 1, "b_id": 2, "winner": None, "raw": "Both judgments are fine.\nScore: 3", "reason": "no verdict",
             "verdict_from": None, "verdict_probs": None},
            {"a_id": 2, "b_id": 1, "winner": "a", "raw": "Judgment A is right.\nVerdict: A", "reason": None,
             "verdict_from": "text", "verdict_probs": None},
            {"a_id": 1, "b_id": 2, "winner": None, "raw": None, "reason": "request failed: HTTP 400",
             "verdict_from": None, "verdict_probs": None}]
    forced_verdicts(TransformersEngine(str(tiny_model), batch_size=2), prompts, rows)
    forced, written, failed = rows
    probs = json.loads(forced["verdict_probs"])
    assert forced["verdict_from"] == "probs" and set(probs) == {"A", "B"} and probs["A"] + probs["B"] > 0
    assert forced["winner"] == ("a" if probs["A"] > probs["B"] else "b")
    assert "read from the probabilities" in forced["reason"]
    assert share_of_a(forced) == pytest.approx(probs["A"] / (probs["A"] + probs["B"]))
    assert written["verdict_from"] == "text" and share_of_a(written) == 1.0  # a written verdict stands
    assert failed["verdict_from"] is None and share_of_a(failed) is None  # a failed request gives nothing
    # Fractional battles rank too: A's share 0.8 in one order and B's share 0.6 in the other favour judgment 1.
    metas = [{"a_id": 1, "b_id": 2, "winner": "a", "verdict_from": "probs", "verdict_probs": json.dumps({"A": 0.8, "B": 0.2})},
             {"a_id": 2, "b_id": 1, "winner": "b", "verdict_from": "probs", "verdict_probs": json.dumps({"A": 0.4, "B": 0.6})}]
    assert judge_pair(9, [1, 2], metas)["chosen_id"] == 1
