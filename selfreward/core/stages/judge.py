"""Stage: K judgments per candidate (table `judgments`): score or NULL + reason,
with the rationale and the raw output always kept; pairwise judges also leave
their both-order comparisons (table `comparisons`)."""

from __future__ import annotations

import json

from selfreward.backends.judges import Group, Verdict
from selfreward.prompts import Parsed
from selfreward.core.store import now


def run(ctx, t: int) -> None:
    if ctx.run.stage_done(t, "judge"):
        return
    cfg = ctx.cfg
    cands = ctx.run.rows(
        "select c.id, c.prompt_id, c.text, c.error, p.text as instruction from candidates c "
        "join prompts p on p.id = c.prompt_id where c.round = ? order by c.prompt_id, c.idx", [t])
    by_prompt: dict[int, list[dict]] = {}
    for c in cands:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    with ctx.stage(t, "judge") as commit:
        judge = ctx.judge(ctx.parent(t))
        # Candidates whose generation failed are not shown to the judge: their judgments are NULL with the reason.
        judged = {pid: [c for c in cs if c["error"] is None] for pid, cs in by_prompt.items()}
        judged = {pid: cs for pid, cs in judged.items() if cs}
        groups = [Group(cs[0]["instruction"], [c["text"] for c in cs]) for cs in judged.values()]
        seed = ctx.seed(t, "judge")
        results = judge.judge_groups(groups, cfg.judge_samples, seed)
        stamp, provenance = now(), ctx.judge_provenance(ctx.parent(t), seed)
        rows, comparisons = [], []
        for cs, result in zip(judged.values(), results):
            for c, verdicts in zip(cs, result.verdicts):
                rows += [judgment_row(t, c["id"], k, judge, v, stamp, provenance) for k, v in enumerate(verdicts)]
            comparisons += [comparison_row(t, cs, judge, x, stamp) for x in result.comparisons]
        skipped = Verdict(None, Parsed(None, "", "not judged: the candidate's generation failed"))
        for c in cands:
            if c["error"] is not None:
                rows += [judgment_row(t, c["id"], k, judge, skipped, stamp, provenance)
                         for k in range(cfg.judge_samples)]
        commit.insert_all("judgments", rows)
        commit.insert_all("comparisons", comparisons)
        commit.detail = judging_detail(rows, comparisons)


def judgment_row(t: int, candidate_id: int, sample: int, judge, v, stamp: str, provenance: dict) -> dict:
    usage = v.usage or {}
    return {"round": t, "candidate_id": candidate_id, "sample": sample, "judge": judge.name,
            "score": v.parsed.score, "reason": v.parsed.reason, "rationale": v.parsed.rationale, "raw": v.raw,
            "n_tokens": v.n_tokens, "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"), "retries": v.retries,
            "finish_reason": v.finish_reason, "expected_score": v.expected,
            "score_probs": json.dumps(v.probs, sort_keys=True) if v.probs else None,
            "template_sha": judge.template_sha, "endpoint": v.endpoint, "served_model": v.served_model,
            "created_at": stamp, **provenance}


def comparison_row(t: int, cands: list[dict], judge, x, stamp: str) -> dict:
    return {"round": t, "prompt_id": cands[x.a]["prompt_id"], "sample": x.sample, "a_id": cands[x.a]["id"],
            "b_id": cands[x.b]["id"], "outcome": x.outcome, "judge": judge.name, "ab_score": x.ab.parsed.score,
            "ba_score": x.ba.parsed.score, "ab_raw": x.ab.raw, "ba_raw": x.ba.raw, "ab_reason": x.ab.parsed.reason,
            "ba_reason": x.ba.parsed.reason, "template_sha": judge.template_sha, "created_at": stamp}


def judging_detail(rows: list[dict], comparisons: list[dict]) -> dict:
    detail = {"judgments": len(rows), "parsed": sum(r["score"] is not None for r in rows),
              "expected": sum(r["expected_score"] is not None for r in rows),
              "failed_requests": sum((r["reason"] or "").startswith("request failed") for r in rows),
              "retries": sum(r["retries"] or 0 for r in rows)}
    both = [c for c in comparisons if c["outcome"] != "unparsed"]
    if comparisons:
        detail["comparisons"] = len(comparisons)
        detail["position_inconsistency"] = (sum(c["outcome"] == "inconsistent" for c in both) / len(both)
                                            if both else None)
    return detail
