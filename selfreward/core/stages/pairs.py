"""Preference pairs from judged candidates: a pure function over rows.

A candidate's score is the mean of its judgments that parsed; judgments that did
not parse never count as any score. Per prompt, chosen is the best and rejected
the worst (with Meta-Rewarding's length control rho, see `pick`); prompts whose
scored candidates tie, or that have fewer than two scored candidates, are kept
as dropped rows with the reason, so `status` can count them.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import mean, median


def candidate_scores(judgments: list[dict], key: str = "score") -> dict[int, list[float]]:
    """Per candidate, its judgments' scores: `key` 'score' (parsed) or 'expected_score' (logprob-
    weighted). A judgment whose parsed score is NULL counts under neither."""
    scores: dict[int, list[float]] = defaultdict(list)
    for j in judgments:
        scores[j["candidate_id"]]  # a candidate with only failed judgments still shows up, empty
        if j["score"] is not None and j.get(key) is not None:
            scores[j["candidate_id"]].append(j[key])
    return scores


def pick(scored: list[tuple[dict, float]], rho: float) -> tuple[tuple[dict, float], tuple[dict, float]] | None:
    """Chosen: the shortest with score >= (1-rho)*max + rho*min. Rejected: the longest
    with score <= (1-rho)*min + rho*max. rho = 0 is the plain max/min rule (ties in
    score broken by length, then by candidate id). None when nothing separates them."""
    hi = max(s for _, s in scored)
    lo = min(s for _, s in scored)
    if hi == lo:
        return None
    top = [(c, s) for c, s in scored if s >= (1 - rho) * hi + rho * lo]
    bottom = [(c, s) for c, s in scored if s <= (1 - rho) * lo + rho * hi]
    chosen = min(top, key=lambda cs: (len(cs[0]["text"]), -cs[1], cs[0]["id"]))
    rejected = max(bottom, key=lambda cs: (len(cs[0]["text"]), -cs[1], -cs[0]["id"]))
    if chosen[0]["id"] == rejected[0]["id"] or chosen[1] <= rejected[1]:
        return None
    return chosen, rejected


def build_pairs(candidates: list[dict], judgments: list[dict], rho: float = 0.0, key: str = "score") -> list[dict]:
    """One row per prompt: status 'kept', 'tie' or 'unscored'."""
    scores = candidate_scores(judgments, key)
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for c in candidates:
        by_prompt[c["prompt_id"]].append(c)
    rule = f"max-min rho={rho}"
    rows = []
    for prompt_id, cands in sorted(by_prompt.items()):
        scored = [(c, mean(scores[c["id"]])) for c in cands if scores.get(c["id"])]
        row = {"prompt_id": prompt_id, "status": "unscored", "chosen_id": None, "rejected_id": None,
               "chosen_score": None, "rejected_score": None, "n_scored": len(scored),
               "n_unscored": len(cands) - len(scored), "rule": rule}
        if len(scored) >= 2:
            picked = pick(scored, rho)
            if picked is None:
                row["status"] = "tie"
            else:
                (c, cs), (r, rs) = picked
                row.update(status="kept", chosen_id=c["id"], rejected_id=r["id"], chosen_score=cs,
                           rejected_score=rs)
        rows.append(row)
    return rows


def run(ctx, t: int) -> None:
    if ctx.run.stage_done(t, "pairs"):
        return
    cands = ctx.run.rows("select id, prompt_id, text from candidates where round = ?", [t])
    # Human labels imported later (import-labels) are audit data, not the judge whose pairs these are.
    judgments = ctx.run.rows("select candidate_id, score, expected_score from judgments where round = ? "
                             "and judge not like 'human:%'", [t])
    key = "expected_score" if ctx.cfg.pair_score == "expected" else "score"
    consistency = {}
    if ctx.cfg.consistency and t >= 2:
        from selfreward.core.stages.consistency import consistency_by_prompt

        prior = ctx.run.rows("select candidate_id, score, expected_score from consistency_judgments "
                             "where round = ?", [t])
        consistency = consistency_by_prompt(cands, judgments, prior, key)
    with ctx.stage(t, "pairs") as commit:
        rows = [{"round": t, "score_kind": ctx.cfg.pair_score, **r,
                 "consistency": consistency.get(r["prompt_id"]) if r["status"] == "kept" else None}
                for r in build_pairs(cands, judgments, ctx.cfg.length_rho, key)]
        commit.insert_all("pairs", rows)
        statuses = [r["status"] for r in rows]
        commit.detail = {s: statuses.count(s) for s in ("kept", "tie", "unscored")}
        commit.detail["score"] = ctx.cfg.pair_score
        commit.detail.update(length_effect(cands, judgments, rows, ctx.cfg.length_rho, key))
        c_values = sorted(r["consistency"] for r in rows if r["consistency"] is not None)
        if c_values:  # CREAM's C over the kept pairs: its distribution this round
            commit.detail["consistency"] = {"n": len(c_values), "min": c_values[0], "median": median(c_values),
                                            "mean": round(mean(c_values), 4), "max": c_values[-1]}


def length_effect(cands: list[dict], judgments: list[dict], rows: list[dict], rho: float, key: str) -> dict:
    """Mean length (characters) of chosen and rejected under the round's rule, and under the plain
    max/min rule (rho = 0) on the same judgments: how length control moved them."""
    text = {c["id"]: c["text"] for c in cands}

    def means(pairs: list[dict]) -> tuple[float | None, float | None]:
        kept = [p for p in pairs if p["status"] == "kept"]
        if not kept:
            return None, None
        return (round(mean(len(text[p["chosen_id"]]) for p in kept), 1),
                round(mean(len(text[p["rejected_id"]]) for p in kept), 1))

    chosen, rejected = means(rows)
    out = {"chosen_chars": chosen, "rejected_chars": rejected}
    if rho > 0:
        out["chosen_chars_rho0"], out["rejected_chars_rho0"] = means(build_pairs(cands, judgments, 0.0, key))
    return out
