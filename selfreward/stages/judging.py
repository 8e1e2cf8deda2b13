"""Stage: K judgments per candidate (table `judgments`): score or NULL + reason,
with the rationale and the raw output always kept."""

from __future__ import annotations

from selfreward.store import now


def run(ctx, t: int) -> None:
    if ctx.run.stage_done(t, "judge"):
        return
    cfg = ctx.cfg
    cands = ctx.run.rows(
        "select c.id, c.text, p.text as instruction from candidates c join prompts p on p.id = c.prompt_id "
        "where c.round = ? order by c.id", [t])
    with ctx.run.stage(t, "judge") as commit:
        judge = ctx.judge(f"M{t - 1}")
        verdicts = judge.judge([(c["instruction"], c["text"]) for c in cands], cfg.judge_samples,
                               ctx.seed(t, "judge"))
        stamp = now()
        rows = [{"round": t, "candidate_id": c["id"], "sample": k, "judge": judge.name,
                 "score": v.parsed.score, "reason": v.parsed.reason, "rationale": v.parsed.rationale,
                 "raw": v.raw, "n_tokens": v.n_tokens, "template_sha": judge.template.sha256,
                 "created_at": stamp}
                for c, per in zip(cands, verdicts) for k, v in enumerate(per)]
        commit.insert_all("judgments", rows)
        parsed = sum(r["score"] is not None for r in rows)
        commit.detail = {"judgments": len(rows), "parsed": parsed}
