"""`selfreward eval`: judge quality against human rankings, and model-vs-model
head-to-head. Results go into run.db (`eval_metrics`, `head2head`) and are
printed as tables."""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from contextlib import closing

from selfreward.core.context import Context
from selfreward.data import read_ift
from selfreward.backends.engines import Sampling
from selfreward.backends.judges import Group, judge_kind
from selfreward.evaluation.judge_quality import (expected_metrics, finite, injection_probe, judge_scores, load_eval_set, quality_metrics,
                                           verbosity_probe)
from selfreward.core.store import Run, now


def store_metrics(run: Run, kind: str, judge: str, model: str, dataset: str, metrics: dict,
           eval_id: str | None = None, head2head: list[dict] = ()) -> str:
    """An evaluation's metrics (and head-to-head rows) in one transaction; returns its eval_id."""
    eval_id = eval_id or uuid.uuid4().hex[:12]
    stamp = now()
    with run.db.atomic():
        run.db["head2head"].insert_all(head2head)
        run.db["eval_metrics"].insert_all(
            {"eval_id": eval_id, "kind": kind, "judge": judge, "model": model, "dataset": dataset, "name": k,
             "value": v, "created_at": stamp} for k, v in finite(metrics).items())
    return eval_id


def eval_judge(run: Run, overrides: dict, models: list[str], dataset: str, limit: int, samples: int,
               verbosity: bool, canaries: bool = True, label: str = "-") -> list[dict]:
    """Table-4 metrics of the configured judge on a ranked set; for the self judge, once per model.
    Another judge's metrics are stored under the model name `label` (a reward model of the run)."""
    cfg = dataclasses.replace(run.config(), **overrides)
    groups = load_eval_set(dataset)[: limit or None]
    # closing: the engine (a vLLM server's process group, say) ends on every way out.
    with closing(Context(run, cfg)) as ctx:
        out = []
        for model in models if judge_kind(cfg).uses_policy else [label]:
            judge = ctx.judge(model)
            t0 = time.perf_counter()
            scores, results = judge_scores(judge, groups, seed=cfg.seed, samples=samples)
            elapsed = time.perf_counter() - t0
            metrics = quality_metrics(groups, scores, results)
            metrics.update(expected_metrics(groups, results))
            metrics["judgments_per_s"] = metrics["n_responses"] * samples / elapsed if elapsed else math.nan
            if verbosity:
                metrics.update(verbosity_probe(judge, groups, seed=cfg.seed))
            if canaries and cfg.judge_mode != "pairwise":
                metrics.update(injection_probe(judge, groups, seed=cfg.seed))
            eval_id = store_metrics(run, "judge", judge.name, model, str(dataset), metrics)
            out.append({"eval_id": eval_id, "judge": judge.name, "model": model, **metrics})
    return out


def head2head(run: Run, overrides: dict, a: str, b: str, prompts_path: str, limit: int) -> dict:
    """M_a vs M_b on held-out prompts, each pair judged in both orders."""
    cfg = dataclasses.replace(run.config(), **overrides)
    mode = judge_kind(cfg).head2head_mode
    if mode:
        # A head-to-head asks "which is better", so LLM judges compare the two answers directly.
        cfg = dataclasses.replace(cfg, judge_mode=mode)
    prompts = [r["instruction"] for r in read_ift(prompts_path)][: limit or None]
    # closing: the engine (a vLLM server's process group, say) ends on every way out.
    with closing(Context(run, cfg)) as ctx:
        sampling = Sampling(cfg.candidate_temperature, cfg.candidate_top_p, cfg.candidate_max_new_tokens, cfg.seed)
        answers = {}
        for model in (a, b):
            outs = ctx.engine(model).generate([[{"role": "user", "content": p}] for p in prompts], 1, sampling,
                                              desc=f"answers {model}")
            answers[model] = [o[0] for o in outs]
        # The self judge is the newer model of the two, as the loop would use it.
        judge = ctx.judge(max(a, b, key=lambda m: int(m[1:])))
        results = judge.judge_groups([Group(p, [x.text, y.text]) for p, x, y in zip(prompts, answers[a], answers[b])],
                                     1, cfg.seed)
        rows, tally = [], {"win": 0, "tie": 0, "loss": 0, "inconsistent": 0, "unscored": 0}
        eval_id = uuid.uuid4().hex[:12]
        for p, x, y, result in zip(prompts, answers[a], answers[b], results):
            outcome = _outcome(result)
            tally[outcome] += 1
            rows.append({"eval_id": eval_id, "prompt": p, "a_model": a, "b_model": b, "a_text": x.text, "b_text": y.text,
                         "a_tokens": x.n_tokens, "b_tokens": y.n_tokens, "outcome": outcome, "judge": judge.name})
    from selfreward.evaluation.winrate import preference, win_rate

    # The raw and length-controlled (AlpacaEval 2) win rates with 95% intervals; lengths in characters.
    rates = win_rate([{"preference": preference(r["outcome"]), "len_a": len(r["a_text"]), "len_b": len(r["b_text"]),
                       "instruction": k} for k, r in enumerate(rows)], seed=cfg.seed)
    n = len(prompts)
    summary = {"n": n, "wins": tally["win"], "ties": tally["tie"] + tally["inconsistent"], "losses": tally["loss"],
               "inconsistent": tally["inconsistent"], "unscored": tally["unscored"],
               "win_rate": (tally["win"] + (tally["tie"] + tally["inconsistent"]) / 2) / n if n else math.nan,
               "a_mean_tokens": sum(r["a_tokens"] for r in rows) / n if n else math.nan,
               "b_mean_tokens": sum(r["b_tokens"] for r in rows) / n if n else math.nan,
               **{k: rates[k] for k in ("win_lo", "win_hi", "win_lc", "win_lc_lo", "win_lc_hi")}}
    store_metrics(run, "head2head", judge.name, f"{a} vs {b}", str(prompts_path), summary, eval_id, rows)
    return {"eval_id": eval_id, "judge": judge.name, "a": a, "b": b, **summary}


def _outcome(result) -> str:
    """From A's side: win, tie, loss; 'inconsistent' when the two orders disagree."""
    if result.comparisons:
        outcome = result.comparisons[0].outcome
        return {"a": "win", "b": "loss", "tie": "tie", "inconsistent": "inconsistent"}.get(outcome, "unscored")
    sa, sb = (v[0].parsed.score if v else None for v in result.verdicts)
    if sa is None or sb is None:
        return "unscored"
    return "win" if sa > sb else "loss" if sa < sb else "tie"
