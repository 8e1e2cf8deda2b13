"""Judge quality across rounds: one line per metric, one column per model (M0 .. M_t, each
as the judge it is after its round), and in words whether the newest judge got worse than
the one before. `status`, the text report and the HTML report all use `judge_trend`.

"Worse" is defined per metric, each with the direction that is better and a margin below
which a move is noise on held-out sets of this size: the newest judge is worse when at least
one tracked metric moved the wrong way by more than its margin, better when at least one
moved the right way and none the wrong way.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfreward.core.store import Run


@dataclass(frozen=True)
class Tracked:
    name: str       # the `metrics` row's name
    label: str
    better: int     # +1: higher is better; -1: lower is better
    margin: float   # smaller moves are not called out
    percent: bool   # shown as a percentage


TRACKED = [
    Tracked("eft_parse_rate", "parse rate", +1, 0.05, True),
    Tracked("eft_pairwise_accuracy", "pairwise accuracy", +1, 0.05, True),
    Tracked("eft_pairwise_ties", "ties", -1, 0.05, True),
    Tracked("eft_spearman", "Spearman", +1, 0.1, False),
    Tracked("eft_expected_pairwise_accuracy", "pairwise accuracy (expected scores)", +1, 0.05, True),
    Tracked("eft_expected_pairwise_ties", "ties (expected scores)", -1, 0.05, True),
    Tracked("eft_expected_spearman", "Spearman (expected scores)", +1, 0.1, False),
    Tracked("bias_position_inconsistency", "position inconsistency", -1, 0.1, True),
    Tracked("bias_verbosity_padded_wins", "padded answer wins", -1, 0.1, True),
    Tracked("bias_selfpref_gap", "self-preference gap (points)", -1, 0.25, False),
]


def show(t: Tracked, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if t.percent else f"{value:+.2f}" if t.name == "bias_selfpref_gap" else f"{value:.2f}"


def judge_trend(run: Run) -> dict:
    """{"models": [...], "rows": [{"metric": label, <model>: shown value}], "verdict": sentence or None,
    "worse": bool} over the run's per-round eval metrics."""
    values: dict[str, dict[str, float]] = {}
    order: dict[str, int] = {}
    names = tuple(t.name for t in TRACKED)
    for r in run.rows(f"select round, model, name, value from metrics where name in ({','.join('?' * len(names))}) "
                      "order by round", names):
        values.setdefault(r["model"], {})[r["name"]] = r["value"]
        order.setdefault(r["model"], r["round"] if r["model"] != "M0" else -1)
    for v in values.values():
        if v.get("eft_parse_rate") == 0:
            # Nothing parsed: accuracy and ties of no scores say nothing (shown '-', never compared).
            for name in [n for n in v if n.startswith("eft_") and n != "eft_parse_rate"]:
                del v[name]
    models = sorted(values, key=lambda m: (order[m], m))
    rows = [{"metric": t.label, **{m: show(t, values[m].get(t.name)) for m in models}}
            for t in TRACKED if any(t.name in values[m] for m in models)]
    out = {"models": models, "rows": rows, "verdict": None, "worse": False}
    if len(models) >= 2:
        out["verdict"], out["worse"] = verdict(models[-2], values[models[-2]], models[-1], values[models[-1]])
    return out


def verdict(before: str, old: dict[str, float], after: str, new: dict[str, float]) -> tuple[str, bool]:
    """The sentence comparing two judges, and whether the second is worse (see the module doc)."""
    worse, better = [], []
    for t in TRACKED:
        if t.name not in old or t.name not in new:
            continue
        move = (new[t.name] - old[t.name]) * t.better
        if abs(move) > t.margin:
            (better if move > 0 else worse).append(f"{t.label} {show(t, old[t.name])} -> {show(t, new[t.name])}")
    if worse:
        text = f"{after} judges worse than {before}: " + ", ".join(worse)
        if better:
            text += "; better: " + ", ".join(better)
        return text + ".", True
    if better:
        return f"{after} judges better than {before}: " + ", ".join(better) + ".", False
    return f"{after} judges about as well as {before} (no tracked metric moved past its margin).", False


def trend_text(run: Run) -> str:
    """The across-rounds table and its sentence, for `status` and the text report."""
    from selfreward.inspection.status import table

    trend = judge_trend(run)
    if not trend["rows"]:
        return "judge quality: no held-out evaluation yet"
    cols = [("metric", "judge quality")] + [(m, m) for m in trend["models"]]
    lines = [table(trend["rows"], cols)]
    if trend["verdict"]:
        lines.append(("WARNING: " if trend["worse"] else "") + trend["verdict"])
    return "\n".join(lines)


# The actor's yardsticks (core/stages/actor.py): (metric, label, percent). A metric with stored
# _lo/_hi is shown with its 95% interval, and the verdict reads that interval.
ACTOR = [
    ("if_prompt_strict", "IF prompt strict", True),
    ("if_prompt_loose", "IF prompt loose", True),
    ("if_inst_strict", "IF instruction strict", True),
    ("if_inst_loose", "IF instruction loose", True),
    ("if_checked", "IF prompts checked", False),
    ("if_unchecked", "IF prompts unchecked", False),
    ("if_floor", "IF fixed-answer floor", True),
    ("win_vs_prev", "win rate vs parent", True),
    ("win_lc_vs_prev", "LC win rate vs parent", True),
    ("win_vs_m1", "win rate vs M1", True),
    ("win_lc_vs_m1", "LC win rate vs M1", True),
]


def actor_trend(run: Run) -> dict:
    """{"models": [...], "rows": [{"metric": label, <model>: shown value}], "values": {model: {name: value}},
    "promoted": {model: reason}, "verdict": sentence or None, "worse": bool}: the actor's yardsticks per
    model, and whether the newest model is worse than its parent beyond the 95% intervals."""
    values: dict[str, dict[str, float]] = {}
    order: dict[str, int] = {}
    for r in run.rows("select round, model, name, value from metrics where name like 'if\\_%' escape '\\' "
                      "or name like 'win\\_%' escape '\\' order by round"):
        values.setdefault(r["model"], {})[r["name"]] = r["value"]
        order.setdefault(r["model"], r["round"] if r["model"] != "M0" else -1)
    models = sorted(values, key=lambda m: (order[m], m))
    gates = {r["model"]: r for r in run.rows("select model, promoted, parent, reason from promotions")}

    def cell(name: str, percent: bool, v: dict) -> str:
        if name not in v:
            return "-"
        shown = f"{100 * v[name]:.0f}%" if percent else f"{v[name]:.0f}"
        if f"{name}_lo" in v and f"{name}_hi" in v:
            shown += f" ({100 * v[name + '_lo']:.0f}-{100 * v[name + '_hi']:.0f})"
        return shown

    rows = [{"metric": label, **{m: cell(name, percent, values[m]) for m in models}}
            for name, label, percent in ACTOR if any(name in values[m] for m in models)]
    if gates:
        rows.append({"metric": "promoted", **{m: ("yes" if gates[m]["promoted"] else "NO") if m in gates else "-"
                                              for m in models}})
    out = {"models": models, "rows": rows, "values": values,
           "promoted": {m: g["reason"] for m, g in gates.items()}, "verdict": None, "worse": False}
    if len(models) >= 2:
        newest = models[-1]
        parent = gates[newest]["parent"] if newest in gates else models[-2]
        if parent in values:
            out["verdict"], out["worse"] = actor_verdict(parent, values[parent], newest, values[newest])
    return out


def actor_verdict(before: str, old: dict, after: str, new: dict) -> tuple[str, bool]:
    """The newest actor against its parent: a verifiable-instruction score is worse (better) when the
    newest model's 95% interval lies wholly below (above) the parent's score; a win rate against the
    parent when its interval lies wholly below (above) 50%."""
    worse, better = [], []
    name = "if_prompt_strict"
    if name in old and f"{name}_lo" in new:
        said = f"IF prompt strict {100 * old[name]:.0f}% -> {100 * new[name]:.0f}%"
        if new[f"{name}_hi"] < old[name]:
            worse.append(said)
        elif new[f"{name}_lo"] > old[name]:
            better.append(said)
    for name in ("win_vs_prev", "win_lc_vs_prev"):
        if f"{name}_hi" in new:
            said = f"{'LC ' if 'lc' in name else ''}win rate vs {before} {100 * new[name]:.0f}%"
            if new[f"{name}_hi"] < 0.5:
                worse.append(said)
            elif new[f"{name}_lo"] > 0.5:
                better.append(said)
    if worse:
        return f"{after} follows instructions worse than {before}: " + ", ".join(worse + better) + ".", True
    if better:
        return f"{after} follows instructions better than {before}: " + ", ".join(better) + ".", False
    return (f"{after} follows instructions about as well as {before} (no yardstick moved beyond its 95% "
            f"interval).", False)


def actor_text(run: Run) -> str:
    """The actor-quality table and its sentence, for `status`, `iterate` and the text report."""
    from selfreward.inspection.status import table

    trend = actor_trend(run)
    if not trend["rows"]:
        return "actor quality: no held-out evaluation yet"
    lines = [table(trend["rows"], [("metric", "actor quality")] + [(m, m) for m in trend["models"]])]
    lines += [f"{m}: {reason}" for m, reason in trend["promoted"].items() if not reason.startswith("promote=")]
    if trend["verdict"]:
        lines.append(("WARNING: " if trend["worse"] else "") + trend["verdict"])
    return "\n".join(lines)
