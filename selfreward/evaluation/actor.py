"""The actor on yardsticks the loop never trains on: its greedy answers to held-out
verifiable instructions (checked by the IFEval/IFBench checkers, see instruct.py),
its win rates against earlier models by an independent judge (see winrate.py), and
the promotion gate that reads them.

Pure functions over answers, judge results and stored rows; the eval stage
(core/stages/actor.py) and `selfreward eval instruct` call them."""

from __future__ import annotations

import math

import numpy as np

from selfreward.backends.engines import Completion, Sampling
from selfreward.backends.judges import Group, GroupResult
from selfreward.evaluation import instruct, winrate

IF_METRICS = ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose")


def greedy(cfg) -> Sampling:
    """Held-out answers are greedy: one answer per prompt that a rerun reproduces."""
    return Sampling(0.0, 1.0, cfg.eval_max_new_tokens, 0)


def chats(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def instruct_eval(engine, items: list[dict], cfg, desc: str) -> tuple[list[Completion], list, dict]:
    """A model's greedy answers to verifiable instructions, every constraint checked, and the
    metrics (with the fixed-answer floor beside them). An item whose request failed is unchecked."""
    outs = engine.generate(chats([i["prompt"] for i in items]), 1, greedy(cfg), desc=desc)
    answers = [o[0] for o in outs]
    results = [instruct.check(i, a.text) if a.error is None else instruct.unchecked(i, f"no answer: {a.error}")
               for i, a in zip(items, answers)]
    summary = instruct.summarize(results)
    metrics = {k: summary[k] for k in (*IF_METRICS, "if_prompt_strict_lo", "if_prompt_strict_hi", "if_checked",
                                       "if_unchecked")}
    metrics["if_floor"] = instruct.floor(items)["if_prompt_strict"]
    return answers, results, metrics


def store(db, answers: list[tuple[dict, tuple | None]], wins: list[dict] = (), decision: dict | None = None,
          stamp: str = "") -> None:
    """Answers with their checks ((item, check result), or None), comparisons and the gate's row, inside
    the caller's transaction: answers first, since the checks and comparisons name them."""
    ids = {}
    for row, checked in answers:
        answer_id = db["eval_answers"].insert(row).last_pk
        ids[(row["dataset"], row["key"])] = answer_id
        if checked is not None:
            db["if_checks"].insert_all({"answer_id": answer_id, **c} for c in instruct.check_rows(*checked))
    for w in wins:
        row = {k: v for k, v in w.items() if k != "key"}
        db["eval_comparisons"].insert({**row, "answer_id": ids[("win", w["key"])], "created_at": stamp})
    if decision is not None:
        db["promotions"].insert({**decision, "created_at": stamp})


def answer_row(t: int, model: str, dataset: str, key: str, prompt: str, c: Completion, stamp: str) -> dict:
    return {"round": t, "model": model, "dataset": dataset, "key": key, "prompt": prompt, "text": c.text,
            "n_tokens": c.n_tokens, "finish_reason": c.finish_reason, "error": c.error, "created_at": stamp}


def prefer(result: GroupResult) -> dict:
    """One held-out prompt judged with A = the model, B = its baseline: A's preference (1 win, 0.5 tie,
    0 loss, None unscored) and the judge's texts. A pairwise judge (api, PairRM) compared in both
    orders: orders that disagree are a tie ('inconsistent', kept apart in the outcome). A pointwise
    judge (a reward model) scored each answer: the higher score wins."""
    if result.comparisons:
        c = result.comparisons[0]
        value = winrate.preference(c.outcome)
        return {"preference": value, "outcome": c.outcome if value is not None else "unscored",
                "ab_score": c.ab.parsed.score, "ba_score": c.ba.parsed.score, "ab_raw": c.ab.raw,
                "ba_raw": c.ba.raw}
    a, b = (v[0] for v in result.verdicts)
    sa, sb = a.parsed.score, b.parsed.score
    if sa is None or sb is None:
        value, outcome = None, "unscored"
    else:
        value = 1.0 if sa > sb else 0.0 if sa < sb else 0.5
        outcome = {1.0: "a", 0.0: "b", 0.5: "tie"}[value]
    return {"preference": value, "outcome": outcome, "ab_score": sa, "ba_score": sb, "ab_raw": a.raw,
            "ba_raw": b.raw}


def compare(judge, prompts: list[str], a_texts: list[str], b_texts: list[str], seed: int) -> list[dict]:
    """Each prompt's A-vs-B preference by `judge` (see prefer)."""
    results = judge.judge_groups([Group(p, [a, b]) for p, a, b in zip(prompts, a_texts, b_texts)], 1, seed)
    return [prefer(r) for r in results]


def paired_difference(a: list[float], b: list[float], seed: int = 0, n_boot: int = 2000) -> dict:
    """The mean of a - b over paired items (the same prompts), with a 95% bootstrap interval
    (items resampled with replacement)."""
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(x) == 0:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(x))}


def per_prompt(run, model: str, metric: str) -> dict[str, float]:
    """A model's stored verifiable answers, one value per prompt key, for `metric`: a prompt-level
    metric is 1/0 for a fully checked prompt; an instruction-level one the share of its checked
    constraints that passed. Prompts with nothing to count are left out."""
    column = "loose" if metric.endswith("loose") else "strict"
    rows = run.rows(f"select a.key, c.{column} ok, c.unchecked from eval_answers a join if_checks c "
                    f"on c.answer_id = a.id where a.model = ? and a.dataset = 'if'", [model])
    by_key: dict[str, list] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    out = {}
    for key, checks in by_key.items():
        checked = [c["ok"] for c in checks if c["unchecked"] is None]
        if metric.startswith("if_prompt"):
            if len(checked) == len(checks):
                out[key] = float(all(checked))
        elif checked:
            out[key] = sum(checked) / len(checked)
    return out


def gate(run, cfg, t: int, model: str, parent: str, metrics: dict) -> dict:
    """Whether M_t becomes the next round's parent: a `promotions` row. With promote='no-regress', M_t
    is kept out when it is worse than its parent on promote_metric beyond the 95% interval: for a
    verifiable-instruction metric, the paired bootstrap interval of M_t - parent lies below 0; for a
    win rate against the parent, its interval lies below 50%."""
    row = {"round": t, "model": model, "parent": parent, "metric": cfg.promote_metric, "value": None, "lo": None,
           "hi": None, "promoted": 1}
    if cfg.promote == "always":
        return {**row, "metric": None, "reason": "promote=always"}
    name = cfg.promote_metric
    if name.startswith("if_"):
        now, before = per_prompt(run, model, name), per_prompt(run, parent, name)
        keys = sorted(set(now) & set(before))
        d = paired_difference([now[k] for k in keys], [before[k] for k in keys], seed=cfg.seed)
        row.update(value=d["diff"], lo=d["lo"], hi=d["hi"])
        if not keys:
            return {**row, "reason": f"no prompts checked for both {model} and {parent}: promoted unmeasured"}
        worse = d["hi"] < 0
        what = (f"{name} {model} - {parent} = {d['diff']:+.3f} (95% interval {d['lo']:+.3f} to {d['hi']:+.3f}, "
                f"{d['n']} prompts)")
    else:
        value, lo, hi = (metrics.get(f"{name}{s}") for s in ("", "_lo", "_hi"))
        row.update(value=value, lo=lo, hi=hi)
        if value is None or hi is None:
            return {**row, "reason": f"{name} not measured: promoted unmeasured"}
        worse = hi < 0.5
        what = f"{name} of {model} against {parent} = {value:.3f} (95% interval {lo:.3f} to {hi:.3f})"
    if worse:
        floor = "0" if name.startswith("if_") else "50%"
        return {**row, "promoted": 0, "reason": f"not promoted: {what}, below {floor}; the next round trains "
                                                f"from {parent}"}
    return {**row, "reason": f"promoted: {what}"}
