"""Stages 'sft' (round 1: M1 = SFT(M0)) and 'dpo' (round t >= 2: M_t from M_{t-1} by
cfg.train_method). The training itself is selfreward.training's; these read their data
from the store and commit M_t, its logged steps and its models row in one transaction."""

from __future__ import annotations

from pathlib import Path

from selfreward.training.fit import model_kind, model_row
from selfreward.training.recipes import preference, sft


def run_sft(ctx, t: int) -> None:
    """Round 1: M1 = SFT(M0) on IFT + EFT."""
    from selfreward.data import eft_target, read_eft, read_ift

    if ctx.run.stage_done(t, "sft"):
        return
    cfg = ctx.cfg
    ift, eft = read_ift(cfg.ift), read_eft(cfg.eft)
    if cfg.sft_max_ift:
        ift = ift[: cfg.sft_max_ift]
    if cfg.sft_max_eft:
        eft = eft[: cfg.sft_max_eft]
    template = ctx.template("additive_judge")  # EFT teaches the additive judge
    eft_pairs = [(template.render(instruction=r["instruction"], response=r["response"]), eft_target(r)) for r in eft]
    ctx.release()
    base = ctx.run.model_path("M0")
    with ctx.stage(t, "sft") as commit:
        out = ctx.run.path / "models" / "M1"
        logs, adapter, info = sft(base, ift, eft_pairs, cfg, out, round=t)
        commit.insert_all("training_steps", logs)
        commit.insert_all("models", [model_row(ctx.run, "M1", t, model_kind(info), "M0", out, adapter,
                                               f"SFT on {len(ift)} IFT + {len(eft)} EFT", info)])
        commit.detail = {"ift": len(ift), "eft": len(eft), **stage_detail(info)}


def run_dpo(ctx, t: int) -> None:
    """Round t >= 2: M_t from M_{t-1} on the round's kept pairs, by cfg.train_method.
    (The stage keeps its first name, 'dpo', whatever the method: run folders resume by it.)"""
    if ctx.run.stage_done(t, "dpo"):
        return
    pairs = ctx.run.rows(
        "select p.text as prompt, c.text as chosen, r.text as rejected, x.consistency from pairs x "
        "join prompts p on p.id = x.prompt_id join candidates c on c.id = x.chosen_id "
        "join candidates r on r.id = x.rejected_id where x.round = ? and x.status = 'kept' order by x.id", [t])
    actor = len(pairs)
    if ctx.cfg.meta_rewarding:
        from selfreward.core.stages.meta import judge_training_pairs

        pairs += judge_training_pairs(ctx, t)  # Meta-Rewarding: the judge learns in the same step
    parent = ctx.run.model(ctx.parent(t))
    name = f"M{t}"
    ctx.release()
    with ctx.stage(t, "dpo") as commit:
        if not pairs:
            return copy_parent(ctx.run, commit, t, parent, "pairs")
        out = ctx.run.path / "models" / name
        logs, adapter, info = preference(ctx.run.model_path(parent["name"]), pairs, ctx.cfg, out, round=t)
        commit.insert_all("training_steps", logs)
        judge = len(pairs) - actor
        note = f"{info['label']} on {actor} pairs" + (f" + {judge} judge pairs" if judge else "")
        commit.insert_all("models", [model_row(ctx.run, name, t, model_kind(info), parent["name"], out, adapter,
                                               note, info)])
        commit.detail = {"pairs": actor, "judge_pairs": judge, **stage_detail(info)}


def copy_parent(run, commit, t: int, parent: dict, what: str) -> None:
    """Nothing to learn from this round: M_t is M_{t-1}, said plainly in the models table."""
    commit.insert_all("models", [model_row(run, f"M{t}", t, "copy", parent["name"], Path(parent["path"]), None,
                                           f"no {what} this round: M_t = M_{{t-1}}")])
    commit.detail = {what: 0}


def stage_detail(info: dict) -> dict:
    keep = ("label", "steps", "four_bit", "merge_gap", "fit_margin", "fit_accuracy")
    return {k: info[k] for k in keep if k in info}
