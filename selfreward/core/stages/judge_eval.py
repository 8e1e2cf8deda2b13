"""Stage: each new model as a judge on the run's held-out ranked set (tables `eft_eval`,
`metrics`): parse rate and the Table-4 metrics (`eft_*`), and, on a few of its prompts,
the bias panels (`bias_*`): position inconsistency as a pairwise judge, the verbosity
probe, and self-preference. So a run shows each round whether its judge got better or
worse (`status`, the report; see inspection/trend.py).

The held-out set is the seed EFT split, or any ranked file given with --eft-eval (an
OpenAssistant import, say)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from selfreward.backends.engines import Sampling
from selfreward.backends.judges import judge_kind
from selfreward.evaluation.judge_quality import (expected_metrics, expected_scores, finite, judge_scores, load_eval_set,
                                           position_probe, quality_metrics, self_preference_answers,
                                           self_preference_probe, verbosity_probe)


def run(ctx, t: int, model: str) -> None:
    """Judge the held-out set with `model` as the judge (for the self judge)."""
    stage = f"eval_{model}"
    cfg = ctx.cfg
    if not cfg.eft_eval or ctx.run.stage_done(t, stage):
        return
    groups = held_out(cfg)
    with ctx.stage(t, stage) as commit:
        judge, seed = ctx.judge(model), ctx.seed(t, stage)
        (scores, results), panels = judge_and_probe(ctx, model, judge, groups, seed)
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
        metrics.update(finite(panels))
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


def judge_and_probe(ctx, model: str, judge, groups: list, seed: int):
    """The held-out judging (judge_scores' scores and results) and the bias panels on the first
    eval_bias_prompts prompts that humans ranked apart (0 = off): position inconsistency (the
    judge's own engine and prompt style, asked pairwise in both orders), the verbosity probe,
    and, for the self judge, self-preference.

    In two waves: the held-out judging, the position probe and the model's own answers, then the
    probes that judge again what the first wave judged (the stage's checkpoint gives those back
    rather than asking twice). Where the judge's engine takes requests from several threads (a
    server: vllm, openai), each wave's parts run at once, so that the server batches them
    together: on the demo's CPU, a judging's time is mostly its longest answer's decoding."""
    from selfreward.backends.judges.llm import LLMJudge

    cfg = ctx.cfg
    probe = [g for g in groups if len(set(g.preference)) > 1][: cfg.eval_bias_prompts]
    llm = isinstance(judge, LLMJudge)
    # Self-preference (self judge only): the policy's own answers, sampled as its candidates are.
    policy = ctx.engine(model) if probe and judge_kind(cfg).uses_policy else None
    answering = Sampling(cfg.candidate_temperature, cfg.candidate_top_p, cfg.candidate_max_new_tokens, seed)
    # Engines whose calls overlap (servers) judge the probes side by side; a ray job takes the whole cluster.
    parallel = llm and getattr(judge.engine, "seeds_per_request", False) and getattr(judge.engine, "parallel_calls",
                                                                                      True)

    def position():
        pairwise = judge if judge.mode == "pairwise" else LLMJudge(judge.engine, judge.sampling, "pairwise", judge.name)
        return position_probe(pairwise, probe, seed)

    first = together({"held_out": lambda: judge_scores(judge, groups, seed),
                      "position": position if probe and llm else None,
                      "answers": (lambda: self_preference_answers(policy, probe, answering)) if policy else None},
                     parallel)
    second = together({
        "verbosity": (lambda: verbosity_probe(judge, probe, seed, limit=len(probe))) if probe else None,
        "self": (lambda: self_preference_probe(policy, judge, probe, answering, seed, first["answers"]))
        if policy else None,
    }, parallel)
    panels = dict(first.get("position", {}))
    panels.update({f"bias_{k}": v for k, v in second.get("verbosity", {}).items()})
    panels.update(second.get("self", {}))
    return first["held_out"], panels


def together(calls: dict, parallel: bool) -> dict:
    """Each call's result by name (None calls skipped): in threads at once where `parallel`, else in order."""
    todo = {name: call for name, call in calls.items() if call is not None}
    if not parallel or len(todo) < 2:
        return {name: call() for name, call in todo.items()}
    with ThreadPoolExecutor(len(todo)) as pool:
        futures = {name: pool.submit(call) for name, call in todo.items()}
        return {name: future.result() for name, future in futures.items()}
