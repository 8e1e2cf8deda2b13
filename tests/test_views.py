"""The store's views (migration m013_views) say what the queries they replace said: status, report,
verify, export and browse read them instead of writing the join and the human-label filter again."""

from __future__ import annotations

from statistics import mean

from fixture_run import STAMP, build_fixture_run


def _with_human_labels(tmp_path):
    """The fixture run, plus a human label on every round-2 candidate (as import-labels writes them)."""
    run = build_fixture_run(tmp_path / "r")
    cands = run.rows("select id, round from candidates where round = 2 order by id")
    run.db["judgments"].insert_all(
        {"round": c["round"], "candidate_id": c["id"], "sample": 9, "judge": "human:ann", "score": 5.0 - k % 6,
         "rationale": "Label Studio annotation 1: ranked 1 of 3", "raw": "{}", "created_at": STAMP}
        for k, c in enumerate(cands))
    return run


def test_pair_texts_is_the_pair_text_join(tmp_path):
    run = _with_human_labels(tmp_path)
    joined = run.rows(
        "select x.id, x.round, x.status, p.text p, c.text c, r.text r, c.n_tokens cn, r.n_tokens rn from pairs x "
        "join prompts p on p.id = x.prompt_id join candidates c on c.id = x.chosen_id "
        "join candidates r on r.id = x.rejected_id order by x.id")
    view = run.rows("select pair_id, round, status, prompt, chosen, rejected, chosen_tokens, rejected_tokens "
                    "from pair_texts order by pair_id")
    assert [tuple(r.values()) for r in view] == [tuple(r.values()) for r in joined]
    assert {r["status"] for r in view} == {"kept"}  # the others have no chosen or rejected
    assert len(view) == 4


def test_model_and_human_judgments_split_judgments(tmp_path):
    run = _with_human_labels(tmp_path)
    ids = lambda sql: [r["id"] for r in run.rows(sql)]  # noqa: E731
    model, human = ids("select id from model_judgments order by id"), ids("select id from human_judgments order by id")
    assert model == ids("select id from judgments where judge not like 'human:%' order by id")
    assert human == ids("select id from judgments where judge like 'human:%' order by id") and len(human) == 12
    assert sorted(model + human) == ids("select id from judgments order by id")


def test_candidate_scores_are_the_model_judges_parsed_means(tmp_path):
    run = _with_human_labels(tmp_path)
    by_candidate: dict[int, list] = {}
    for j in run.rows("select candidate_id, score from judgments where judge not like 'human:%'"):
        by_candidate.setdefault(j["candidate_id"], []).append(j["score"])
    rows = {r["candidate_id"]: r for r in run.rows("select * from candidate_scores")}
    assert set(rows) == set(by_candidate)
    for cid, scores in by_candidate.items():
        parsed = [s for s in scores if s is not None]
        assert rows[cid]["samples"] == len(scores) and rows[cid]["parsed"] == len(parsed)
        assert rows[cid]["mean"] == (mean(parsed) if parsed else None)
        assert rows[cid]["spread"] == (max(parsed) - min(parsed) if parsed else None)
