"""Stage: each new model as an actor, on yardsticks the loop never trains on (tables
`eval_answers`, `if_checks`, `eval_comparisons`, `promotions`; `metrics`):

- its greedy answers to held-out verifiable instructions (`if_eval`), every constraint
  checked by the IFEval/IFBench checkers: `if_prompt_strict` .. `if_unchecked`;
- from round 2, its win rates by the independent `eval_judge` against its parent (the
  model it trained from, M_{t-1} unless that one was not promoted) and against M1:
  `win_vs_prev`, `win_lc_vs_prev`, `win_vs_m1`, `win_lc_vs_m1`, each with its interval;
- the promotion gate (`promote`): whether M_t is the next round's parent, and why.

The judge that grades the loop's pairs is the policy itself; none of these use it."""

from __future__ import annotations

from selfreward.core.store import now
from selfreward.evaluation import actor, instruct, tracking, winrate


def run(ctx, t: int, model: str) -> None:
    stage = f"actor_{model}"
    cfg = ctx.cfg
    if ctx.run.stage_done(t, stage) or not (cfg.if_eval or cfg.eval_judge != "none" or t >= 2):
        return
    parent = ctx.parent(t) if t >= 2 else None
    with ctx.stage(t, stage) as commit:
        stamp, metrics, answers = now(), {}, []
        if cfg.if_eval:
            items = instruct.load_if_eval(cfg.if_eval, cfg.if_eval_size or None)
            outs, results, found = actor.instruct_eval(ctx.engine(model), items, cfg,
                                                       f"{model} verifiable instructions")
            metrics.update(found)
            answers += [(actor.answer_row(t, model, "if", i["key"], i["prompt"], o, stamp), (i, r))
                        for i, o, r in zip(items, outs, results)]
        wins = []
        if cfg.eval_judge != "none":
            prompts = winrate_prompts(cfg)
            outs = ctx.engine(model).generate(actor.chats([p for _, p in prompts]), 1, actor.greedy(cfg),
                                              desc=f"{model} held-out answers")
            answers += [(actor.answer_row(t, model, "win", k, p, o[0], stamp), None)
                        for (k, p), o in zip(prompts, outs)]
            if t >= 2:
                mine = {k: o[0] for (k, _), o in zip(prompts, outs)}
                wins, found = win_rates(ctx, t, model, parent, prompts, mine)
                metrics.update(found)
        decision = actor.gate(ctx.run, cfg, t, model, parent, metrics) if t >= 2 else None
        commit.add(lambda db: actor.store(db, answers, wins, decision, stamp))
        commit.insert_all("metrics", [{"round": t, "model": model, "name": k, "value": v}
                                      for k, v in metrics.items() if v is not None and v == v])
        commit.detail = {**metrics, **({"promoted": decision["promoted"], "reason": decision["reason"]}
                                       if decision else {})}
    if cfg.report_to != "none":  # the round's judge and actor metrics, now committed
        tracking.report(cfg, ctx.run.path, t, {r["name"]: r["value"] for r in ctx.run.rows(
            "select name, value from metrics where round = ? and model = ?", [t, model])})


def winrate_prompts(cfg) -> list[tuple[str, str]]:
    """(key, instruction) of the held-out win-rate set: its first win_eval_size lines."""
    from selfreward.data import read_ift

    rows = read_ift(cfg.win_eval)[: cfg.win_eval_size or None]
    return [(str(i), r["instruction"]) for i, r in enumerate(rows)]


def win_rates(ctx, t: int, model: str, parent: str, prompts, mine: dict) -> tuple[list[dict], dict]:
    """M_t against its parent and against M1 on the held-out instructions, by the eval judge; the
    comparison rows (answer ids filled in at store time) and the metrics."""
    rows, metrics = [], {}
    judge = ctx.eval_judge()
    baselines = {"prev": parent, "m1": "M1"}
    done: dict[str, tuple[list, dict]] = {}
    for label, baseline in baselines.items():
        if baseline == model:
            continue
        if baseline not in done:
            theirs = {r["key"]: r for r in ctx.run.rows(
                "select id, key, text, n_tokens, error from eval_answers where model = ? and dataset = 'win'",
                [baseline])}
            keys = [k for k, _ in prompts if k in theirs and theirs[k]["error"] is None and mine[k].error is None]
            if not keys:
                continue
            texts = dict(prompts)
            prefs = actor.compare(judge, [texts[k] for k in keys], [mine[k].text for k in keys],
                                  [theirs[k]["text"] for k in keys], ctx.seed(t, f"win:{baseline}"))
            # Lengths in characters, as AlpacaEval counts them.
            found = winrate.win_rate([{"preference": p["preference"], "len_a": len(mine[k].text),
                                       "len_b": len(theirs[k]["text"]), "instruction": k}
                                      for k, p in zip(keys, prefs)], seed=ctx.cfg.seed)
            rows += [{"round": t, "model": model, "baseline": baseline, "key": k,
                      "baseline_answer_id": theirs[k]["id"], "judge": judge.name, "template_sha": judge.template_sha,
                      **p} for k, p in zip(keys, prefs)]
            done[baseline] = found
        found = done[baseline]
        for kind in ("win", "win_lc"):  # win_vs_prev, win_vs_prev_lo, win_vs_prev_hi, win_lc_vs_prev, ...
            for end in ("", "_lo", "_hi"):
                metrics[f"{kind}_vs_{label}{end}"] = found.get(f"{kind}{end}")
        metrics[f"len_model_vs_{label}"], metrics[f"len_{label}"] = found.get("len_a"), found.get("len_b")
        metrics[f"ties_vs_{label}"], metrics[f"unscored_vs_{label}"] = found.get("ties"), found.get("unscored")
    return rows, metrics
