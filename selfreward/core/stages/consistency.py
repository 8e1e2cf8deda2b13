"""Stage (optional, consistency=yes): CREAM's consistency across rounds (Wang et al.,
ICLR 2025, "CREAM: Consistency Regularized Self-Rewarding Language Models").

The round's candidates are judged again by the previous round's judge, M_{t-2} (table
`consistency_judgments`, the same rows as `judgments`). Per prompt, the candidates'
mean scores under the two judges are compared by Kendall's tau (tau-b, ties allowed);
the pair's consistency is C = (tau + 1) / 2, stored with the pair (`pairs.consistency`),
and DPO trains the pair with C * DPO(y+, y-) + (1 - C) * DPO(y-, y+). Where the previous
judge gives fewer than two of the prompt's candidates a score, or scores them all alike,
it says nothing about their order: C is NULL and the pair trains as plain DPO.
"""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import mean

from selfreward.core.stages.judge import judgment_row
from selfreward.core.store import now


def consistency_by_prompt(candidates: list[dict], current: list[dict], prior: list[dict],
                          key: str = "score") -> dict[int, float | None]:
    """C per prompt from the two judges' mean scores of its candidates (see the module doc)."""
    from scipy.stats import kendalltau

    def means(judgments):
        scores = defaultdict(list)
        for j in judgments:
            if j["score"] is not None and j.get(key) is not None:
                scores[j["candidate_id"]].append(j[key])
        return {cid: mean(xs) for cid, xs in scores.items()}

    now_, before = means(current), means(prior)
    by_prompt = defaultdict(list)
    for c in candidates:
        if c["id"] in now_ and c["id"] in before:
            by_prompt[c["prompt_id"]].append(c["id"])
    out: dict[int, float | None] = {c["prompt_id"]: None for c in candidates}
    for pid, ids in by_prompt.items():
        if len(ids) < 2 or len({before[i] for i in ids}) < 2 or len({now_[i] for i in ids}) < 2:
            continue
        tau = kendalltau([now_[i] for i in ids], [before[i] for i in ids]).statistic
        if not math.isnan(tau):
            out[pid] = round(float(tau + 1) / 2, 6)
    return out


def run(ctx, t: int) -> None:
    cfg = ctx.cfg
    if not cfg.consistency or t < 2 or ctx.run.stage_done(t, "consistency"):
        return
    from selfreward.backends.judges import Group

    cands = ctx.run.rows(
        "select c.id, c.prompt_id, c.text, p.text as instruction from candidates c join prompts p on p.id = c.prompt_id "
        "where c.round = ? and c.error is null order by c.prompt_id, c.idx", [t])
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for c in cands:
        by_prompt[c["prompt_id"]].append(c)
    previous = ctx.parent(t - 1)  # the judge before the current one (M_{t-2} when every model was promoted)
    with ctx.stage(t, "consistency") as commit:
        judge = ctx.judge(previous)
        seed = ctx.seed(t, "consistency")
        results = judge.judge_groups([Group(cs[0]["instruction"], [c["text"] for c in cs]) for cs in by_prompt.values()],
                                     cfg.judge_samples, seed)
        stamp, provenance = now(), ctx.judge_provenance(previous, seed)
        keep = ("round", "candidate_id", "sample", "judge", "score", "expected_score", "reason", "rationale", "raw",
                "n_tokens", "finish_reason", "template_sha", "judge_model_sha", "sampling", "created_at")
        rows = []
        for cs, result in zip(by_prompt.values(), results):
            for c, verdicts in zip(cs, result.verdicts):
                for k, v in enumerate(verdicts):
                    row = judgment_row(t, c["id"], k, judge, v, stamp, provenance)
                    rows.append({col: row[col] for col in keep})
        commit.insert_all("consistency_judgments", rows)
        current = ctx.run.rows("select candidate_id, score, expected_score from judgments where round = ? "
                               "and judge not like 'human:%'", [t])
        key = "expected_score" if cfg.pair_score == "expected" else "score"
        c_values = [c for c in consistency_by_prompt(cands, current, rows, key).values() if c is not None]
        commit.detail = {"judge": previous, "judgments": len(rows), "parsed": sum(r["score"] is not None for r in rows),
                         "prompts_with_c": len(c_values)}
        if c_values:
            commit.detail["mean_c"] = round(mean(c_values), 4)
