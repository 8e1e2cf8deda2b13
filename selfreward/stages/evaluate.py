"""Stage: judge quality of a model on the held-out EFT split (tables `eft_eval`, `metrics`).

Each example is judged once; we record whether the output parsed, and how the
parsed scores compare with the gold ones (exact match, mean absolute error, and
pairwise order agreement among responses to the same instruction).
"""

from __future__ import annotations

from itertools import combinations

from selfreward.data import read_eft


def eft_metrics(rows: list[dict], examples: list[dict]) -> dict[str, float]:
    n = len(rows)
    parsed = [r for r in rows if r["score"] is not None]
    out = {"eft_n": n, "eft_parse_rate": len(parsed) / n if n else 0.0}
    if parsed:
        out["eft_exact_match"] = sum(r["score"] == r["gold_score"] for r in parsed) / len(parsed)
        out["eft_mae"] = sum(abs(r["score"] - r["gold_score"]) for r in parsed) / len(parsed)
    # Pairwise agreement: pairs of responses to one instruction with different gold scores.
    agree = total = 0
    by_instruction: dict[str, list[dict]] = {}
    for r in parsed:
        by_instruction.setdefault(examples[r["example"]]["instruction"], []).append(r)
    for group in by_instruction.values():
        for a, b in combinations(group, 2):
            if a["gold_score"] != b["gold_score"]:
                total += 1
                agree += (a["score"] - b["score"]) * (a["gold_score"] - b["gold_score"]) > 0
    if total:
        out["eft_pairwise_accuracy"] = agree / total
    return out


def run(ctx, t: int, model: str) -> None:
    stage = f"eval_{model}"
    cfg = ctx.cfg
    if not cfg.eft_eval or ctx.run.stage_done(t, stage):
        return
    examples = read_eft(cfg.eft_eval)
    if cfg.eval_eft_size:
        examples = examples[: cfg.eval_eft_size]
    with ctx.run.stage(t, stage) as commit:
        judge = ctx.judge(model)
        verdicts = judge.judge([(e["instruction"], e["response"]) for e in examples], 1, ctx.seed(t, stage))
        rows = [{"round": t, "model": model, "example": i, "gold_score": e["score"], "score": v.parsed.score,
                 "reason": v.parsed.reason, "raw": v.raw}
                for i, (e, (v,)) in enumerate(zip(examples, verdicts))]
        metrics = eft_metrics(rows, examples)
        commit.insert_all("eft_eval", rows)
        commit.insert_all("metrics", [{"round": t, "model": model, "name": k, "value": v}
                                      for k, v in metrics.items()])
        commit.detail = metrics
