"""The Self-Rewarding loop. Round 1 makes M1 = SFT(M0); each round t >= 2 makes
M_t from M_{t-1}: self-instruct -> candidates -> judge -> pairs -> DPO (or SimPO);
with train_method 'grpo' or 'rloo': self-instruct -> online RL, rewarded by the judge."""

from __future__ import annotations

from pathlib import Path

from selfreward import failpoints
from selfreward.core.context import Context
from selfreward.backends.models import resolve_policy, weights_sha
from selfreward.core.stages import (actor, candidates, consistency, judge, judge_eval, meta, pairs, rl,
                                   self_instruct, train)
from selfreward.core.store import now
from selfreward.training.methods import METHODS


def iterate(ctx: Context, rounds: int) -> list[int]:
    """Bring the run to M_rounds; returns the rounds that did work (empty: nothing to do). Where the
    promotion gate kept promote_patience models in a row, ctx.stopped says why and the loop ends."""
    register_m0(ctx)
    worked = []
    for t in range(1, rounds + 1):
        if round_finished(ctx, t):
            continue
        if stalled(ctx, t - 1):
            break
        start_round(ctx, t)
        if t == 1:
            judge_eval.run(ctx, t, "M0")        # how well does the base judge? (parse rate)
            actor.run(ctx, t, "M0")             # ... and the base actor (verifiable instructions)
            train.run_sft(ctx, t)               # M1 = SFT(M0) on IFT + EFT
        elif METHODS[ctx.cfg.train_method].online:
            self_instruct.run(ctx, t)           # M_{t-1} writes new prompts
            rl.run(ctx, t)                      # M_t = GRPO/RLOO(M_{t-1}): sample, judge, update, online
        else:
            self_instruct.run(ctx, t)           # M_{t-1} writes new prompts
            candidates.run(ctx, t)              # ... answers each N times
            judge.run(ctx, t)                   # ... and judges each answer K times
            meta.run(ctx, t)                    # Meta-Rewarding: ... and judges its judgments (optional)
            consistency.run(ctx, t)             # CREAM: M_{t-2} judges the answers too (optional)
            pairs.run(ctx, t)                   # best vs worst per prompt
            train.run_dpo(ctx, t)               # M_t = DPO(M_{t-1}) on those pairs
        judge_eval.run(ctx, t, f"M{t}")         # M_t as a judge
        actor.run(ctx, t, f"M{t}")              # M_t as an actor, and the promotion gate
        failpoints.hit(f"r{t}:finish")
        finish_round(ctx, t)
        worked.append(t)
        if stalled(ctx, t):
            break
    ctx.release()
    return worked


def stalled(ctx: Context, t: int) -> bool:
    """Have the last promote_patience rounds up to t all been kept out by the gate? Sets ctx.stopped."""
    n = ctx.cfg.promote_patience
    rows = ctx.run.rows("select round, promoted, reason from promotions where round <= ? order by round desc "
                        "limit ?", [t, n])
    if len(rows) < n or any(r["promoted"] for r in rows) or rows[0]["round"] != t:
        return False
    ctx.stopped = (f"the loop stopped after round {t}: {n} model(s) in a row not promoted "
                   f"(promote=no-regress); last: M{t} {rows[0]['reason']}")
    return True

def register_m0(ctx: Context) -> None:
    if ctx.run.db.execute("select 1 from models where name = 'M0'").fetchone():
        return
    path = resolve_policy(ctx.cfg.model)  # a hub id: the snapshot of its revision now, which is what loads
    note = f"source: {ctx.cfg.model}"
    if Path(path).parent.name == "snapshots" and not Path(ctx.cfg.model).exists():
        note += f" (hub revision {Path(path).name})"
    with ctx.run.db.atomic():
        ctx.run.db["models"].insert({"name": "M0", "round": 0, "kind": "base", "parent": None, "path": path,
                                     "adapter_path": None, "note": note,
                                     "created_at": now(), "sha256": weights_sha(Path(path))})


def round_finished(ctx: Context, t: int) -> bool:
    row = ctx.run.db.execute("select finished_at from rounds where round = ?", [t]).fetchone()
    return bool(row and row[0])


def start_round(ctx: Context, t: int) -> None:
    """Round t trains M_t from the newest promoted model (M_{t-1} unless the gate kept it out)."""
    row = ctx.run.db.execute("select promoted, parent from promotions where round = ?", [t - 1]).fetchone()
    parent = row[1] if row and not row[0] else f"M{t - 1}"
    with ctx.run.db.atomic():
        ctx.run.db["rounds"].insert({"round": t, "model_in": parent, "model_out": f"M{t}",
                                     "started_at": now()}, ignore=True)


def finish_round(ctx: Context, t: int) -> None:
    wall = ctx.run.db.execute("select sum(wall_s) from stages where round = ?", [t]).fetchone()[0]
    with ctx.run.db.atomic():
        ctx.run.db["rounds"].update(t, {"finished_at": now(), "wall_s": wall})
