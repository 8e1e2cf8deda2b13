"""Stage: N sampled responses per prompt from M_{t-1} (table `candidates`). A
response whose request failed is kept with its reason (`error`); it is never
judged and never enters a pair."""

from __future__ import annotations

from selfreward.backends.engines import Sampling


def run(ctx, t: int) -> None:
    if ctx.run.stage_done(t, "candidates"):
        return
    cfg = ctx.cfg
    prompts = ctx.run.rows("select id, text from prompts where round = ? order by id", [t])
    model = ctx.parent(t)
    with ctx.stage(t, "candidates") as commit:
        sampling = Sampling(cfg.candidate_temperature, cfg.candidate_top_p, cfg.candidate_max_new_tokens,
                            ctx.seed(t, "candidates"))
        outs = ctx.engine(model).generate([[{"role": "user", "content": p["text"]}] for p in prompts],
                                          cfg.n_candidates, sampling, desc=f"round {t} candidates")
        rows = [{"round": t, "prompt_id": p["id"], "idx": j, "text": c.text, "n_tokens": c.n_tokens,
                 "finish_reason": c.finish_reason, "model": model, "error": c.error, "retries": c.retries}
                for p, per in zip(prompts, outs) for j, c in enumerate(per)]
        commit.insert_all("candidates", rows)
        commit.detail = {"prompts": len(prompts), "candidates": len(rows),
                         "truncated": sum(r["finish_reason"] == "length" for r in rows),
                         "failed": sum(r["error"] is not None for r in rows)}
