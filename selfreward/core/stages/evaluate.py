"""Stage: each new model as a judge on the held-out EFT split (tables `eft_eval`,
`metrics`): parse rate and the Table-4 metrics, so a run shows each round whether
its judge got better or worse."""

from __future__ import annotations

from selfreward.data import read_eft
from selfreward.inspection.metrics import (expected_metrics, expected_scores, finite, groups_from_eft, judge_scores,
                                           quality_metrics)


def run(ctx, t: int, model: str) -> None:
    """Judge the held-out EFT split with `model` as the judge (for the self judge)."""
    stage = f"eval_{model}"
    cfg = ctx.cfg
    if not cfg.eft_eval or ctx.run.stage_done(t, stage):
        return
    examples = read_eft(cfg.eft_eval)
    if cfg.eval_eft_size:
        examples = examples[: cfg.eval_eft_size]
    groups = groups_from_eft(examples)
    with ctx.stage(t, stage) as commit:
        scores, results = judge_scores(ctx.judge(model), groups, ctx.seed(t, stage))
        rows, k = [], 0
        for g, s, e, result in zip(groups, scores, expected_scores(results), results):
            for text_score, expected, gold, verdicts in zip(s, e, g.gold_scores, result.verdicts):
                v = verdicts[0]
                rows.append({"round": t, "model": model, "example": k, "gold_score": gold, "score": text_score,
                             "expected_score": expected, "reason": v.parsed.reason, "raw": v.raw})
                k += 1
        quality = {**quality_metrics(groups, scores, results), **expected_metrics(groups, results)}
        metrics = {f"eft_{name}": value for name, value in finite(quality).items()}
        commit.insert_all("eft_eval", rows)
        commit.insert_all("metrics", [{"round": t, "model": model, "name": name, "value": value}
                                      for name, value in metrics.items()])
        commit.detail = metrics
