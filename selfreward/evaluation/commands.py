"""`selfreward eval instruct`: the actor's verifiable instruction following, outside the loop,
on any IFEval-format file. Answers and per-constraint checks go into run.db (`eval_answers`
under the dataset 'if:<eval_id>', `if_checks`), the metrics into `eval_metrics`."""

from __future__ import annotations

import dataclasses
import uuid
from contextlib import closing

from selfreward.core.context import Context
from selfreward.core.store import Run, now
from selfreward.evaluation import actor, instruct


def eval_instruct(run: Run, models: list[str], data: str, limit: int, max_new_tokens: int | None = None) -> list[dict]:
    """Each model's IF metrics on `data` (its first `limit` prompts; 0 = all), stored and returned."""
    cfg = run.config()
    if max_new_tokens:
        cfg = dataclasses.replace(cfg, eval_max_new_tokens=max_new_tokens)
    items = instruct.load_if_eval(data, limit or None)
    out = []
    with closing(Context(run, cfg)) as ctx:  # the engine (a vLLM server's group) ends on every way out
        for model in models:
            answers, results, metrics = actor.instruct_eval(ctx.engine(model), items, cfg,
                                                            f"{model} verifiable instructions")
            eval_id, stamp = uuid.uuid4().hex[:12], now()
            rows = [(actor.answer_row(None, model, f"if:{eval_id}", i["key"], i["prompt"], a, stamp), (i, r))
                    for i, a, r in zip(items, answers, results)]
            with run.db.atomic():
                actor.store(run.db, rows)
                run.db["eval_metrics"].insert_all(
                    {"eval_id": eval_id, "kind": "instruct", "judge": "if-verifiable", "model": model,
                     "dataset": str(data), "name": k, "value": v, "created_at": stamp}
                    for k, v in metrics.items() if v is not None and v == v)
            out.append({"eval_id": eval_id, "model": model, "n": len(items), **metrics})
    return out
