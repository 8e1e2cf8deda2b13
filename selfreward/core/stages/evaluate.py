"""Stage: each new model as a judge on the run's held-out ranked set (tables `eft_eval`,
`metrics`): parse rate and the Table-4 metrics (`eft_*`), and, on a few of its prompts,
the bias panels (`bias_*`): position inconsistency as a pairwise judge, the verbosity
probe, and self-preference. So a run shows each round whether its judge got better or
worse (`status`, the report; see inspection/trend.py).

The held-out set is the seed EFT split, or any ranked file given with --eft-eval (an
OpenAssistant import, say)."""

from __future__ import annotations

from selfreward.backends.engines import Sampling
from selfreward.inspection.metrics import (expected_metrics, expected_scores, finite, judge_scores, load_eval_set,
                                           position_probe, quality_metrics, self_preference_probe, verbosity_probe)


def run(ctx, t: int, model: str) -> None:
    """Judge the held-out set with `model` as the judge (for the self judge)."""
    stage = f"eval_{model}"
    cfg = ctx.cfg
    if not cfg.eft_eval or ctx.run.stage_done(t, stage):
        return
    groups = held_out(cfg)
    with ctx.stage(t, stage) as commit:
        judge, seed = ctx.judge(model), ctx.seed(t, stage)
        scores, results = judge_scores(judge, groups, seed)
        rows, k = [], 0
        for g, s, e, result in zip(groups, scores, expected_scores(results), results):
            golds = g.gold_scores or [None] * len(s)
            for text_score, expected, gold, verdicts in zip(s, e, golds, result.verdicts):
                v = verdicts[0]
                rows.append({"round": t, "model": model, "example": k, "gold_score": gold, "score": text_score,
                             "expected_score": expected, "reason": v.parsed.reason, "raw": v.raw})
                k += 1
        quality = {**quality_metrics(groups, scores, results), **expected_metrics(groups, results)}
        metrics = {f"eft_{name}": value for name, value in finite(quality).items()}
        metrics.update(finite(bias_panels(ctx, model, judge, groups, seed)))
        commit.insert_all("eft_eval", rows)
        commit.insert_all("metrics", [{"round": t, "model": model, "name": name, "value": value}
                                      for name, value in metrics.items()])
        commit.detail = metrics


def held_out(cfg) -> list:
    """The held-out ranked set's groups: the first eval_eft_size responses (0 = all), in groups of two or more."""
    groups = load_eval_set(cfg.eft_eval)
    if not cfg.eval_eft_size:
        return groups
    out, left = [], cfg.eval_eft_size
    for g in groups:
        if left <= 0:
            break
        n = min(left, len(g.responses))
        out.append(type(g)(g.instruction, g.responses[:n], g.preference[:n],
                           g.gold_scores[:n] if g.gold_scores else None, g.reference))
        left -= n
    return out


def bias_panels(ctx, model: str, judge, groups: list, seed: int) -> dict[str, float]:
    """The bias probes on the first eval_bias_prompts prompts that humans ranked apart (0 = off):
    position inconsistency (the judge's own engine and prompt style, asked pairwise in both
    orders), the verbosity probe, and, for the self judge, self-preference."""
    from selfreward.backends.judges.llm import LLMJudge

    cfg = ctx.cfg
    probe = [g for g in groups if len(set(g.preference)) > 1][: cfg.eval_bias_prompts]
    if not probe:
        return {}
    out: dict[str, float] = {}
    if isinstance(judge, LLMJudge):
        pairwise = judge if judge.mode == "pairwise" else LLMJudge(judge.engine, judge.sampling, "pairwise", judge.name)
        out.update(position_probe(pairwise, probe, seed))
    out.update({f"bias_{k}": v for k, v in verbosity_probe(judge, probe, seed, limit=len(probe)).items()})
    if cfg.judge == "self":
        sampling = Sampling(cfg.candidate_temperature, cfg.candidate_top_p, cfg.candidate_max_new_tokens, seed)
        out.update(self_preference_probe(ctx.engine(model), judge, probe, sampling, seed))
    return out
