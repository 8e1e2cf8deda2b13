from selfreward.core.stages.pairs import build_pairs


def cands(prompt_id, texts, start=0):
    return [{"id": start + i, "prompt_id": prompt_id, "text": t} for i, t in enumerate(texts)]


def js(scores_by_candidate):
    return [{"candidate_id": c, "score": s} for c, scores in scores_by_candidate.items() for s in scores]


def test_highest_mean_vs_lowest_mean():
    rows = build_pairs(cands(1, ["a", "bb", "ccc"]), js({0: [4, 5, 3], 1: [1, 2, 1], 2: [3, 3, 3]}))
    (row,) = rows
    assert row["status"] == "kept"
    assert (row["chosen_id"], row["rejected_id"]) == (0, 1)
    assert row["chosen_score"] == 4 and row["rejected_score"] == 4 / 3


def test_failed_parses_never_count_as_a_score():
    # Candidate 1's only parse is a 5; its failures (None) must not drag it to 0.
    rows = build_pairs(cands(1, ["a", "b"]), js({0: [2, 2, 2], 1: [None, 5, None]}))
    assert rows[0]["chosen_id"] == 1 and rows[0]["chosen_score"] == 5
    assert rows[0]["n_unscored"] == 0


def test_ties_and_unscored_prompts_are_dropped_with_reasons():
    candidates = cands(1, ["a", "b"]) + cands(2, ["c", "d"], start=10) + cands(3, ["e", "f"], start=20)
    judgments = js({0: [3], 1: [3], 10: [None, None], 11: [4], 20: [None], 21: [None]})
    by_prompt = {r["prompt_id"]: r for r in build_pairs(candidates, judgments)}
    assert by_prompt[1]["status"] == "tie"
    assert by_prompt[2]["status"] == "unscored" and by_prompt[2]["n_unscored"] == 1
    assert by_prompt[3]["status"] == "unscored" and by_prompt[3]["n_scored"] == 0
    assert all(r["chosen_id"] is None for r in by_prompt.values())


def test_length_control_prefers_short_chosen_and_long_rejected():
    texts = ["short", "a much much longer answer", "x" * 40, "tiny"]
    judgments = js({0: [4.5], 1: [5], 2: [1], 3: [1.5]})
    plain = build_pairs(cands(1, texts), judgments, rho=0.0)[0]
    assert (plain["chosen_id"], plain["rejected_id"]) == (1, 2)
    controlled = build_pairs(cands(1, texts), judgments, rho=0.2)[0]
    # With rho=0.2 the band is [4.2, 5] for chosen and [1, 1.8] for rejected.
    assert (controlled["chosen_id"], controlled["rejected_id"]) == (0, 2)
