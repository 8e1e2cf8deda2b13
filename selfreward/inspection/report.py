"""A static HTML report of a run: per-round charts (PNG) and tables in one page.

The page is self-contained apart from its PNGs, which sit next to it and are
referenced by relative path, so the folder can be copied or served as is.
Charts are drawn on bare matplotlib Figures with the Agg canvas: no pyplot
state, no display needed, and matplotlib is only imported when a report is made.
"""

from __future__ import annotations

import html
import json
import os
from collections import defaultdict
from pathlib import Path

from selfreward.inspection.status import COLUMNS, EVAL_COLUMNS, fmt, round_summary
from selfreward.core.store import Run, now
from selfreward.training.methods import METHODS

NO_DATA = "no data yet"
# Judge-quality metrics on a 0..1 scale, so they share one axis; counts and MAE go in the table only.
QUALITY = ["parse_rate", "pairwise_accuracy", "five_best", "exact_match", "spearman", "kendall_tau"]
COUNTS = {"n", "n_prompts", "n_responses", "verbosity_n", "round"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .empty { color: #888; font-style: italic; } .note { color: #555; }
.worse { color: #a00; }
"""


def build_report(run: Run, out_dir: str | Path | None = None) -> Path:
    """Write report.html and its charts into out_dir (default runs/<name>/report/); return report.html."""
    out = Path(out_dir) if out_dir is not None else run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = round_summary(run)
    name = run.path.name
    parts = [f"<h1>Self-Rewarding run {_e(name)}</h1>",
             f"<p class=note>Generated {_e(now())} from {_e(str(run.path / 'run.db'))}.</p>",
             "<h2>Rounds</h2>"]
    if summary:
        parts.append(_table([[title for _, title in COLUMNS]]
                            + [[_cell(k, r.get(k)) for k, _ in COLUMNS] for r in summary]))
        parts.append("<ul>" + "".join(
            f"<li>Round {r['round']} ({_e(r['model'])}): "
            + (f"finished in {fmt('wall_s', r['wall_s'])}" if r["done"] else "in progress") + "</li>"
            for r in summary) + "</ul>")
        parts.append("<p class=note>Round 1 trains M1 = SFT(M0) on the seed data; every later round t "
                     "samples and judges candidates with M<sub>t-1</sub> and trains M<sub>t</sub> from its pairs "
                     "(DPO, or the method in the train column).</p>")
    else:
        parts.append(f"<p class=empty>No rounds yet: {NO_DATA}.</p>")
    for section in (_scores, _pairs, _lengths, _training, _models, _actor_quality, _judge_quality, _judge_training):
        parts.append(section(run, out))
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>selfreward report: {_e(name)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    path = out / "report.html"
    # Written whole then renamed, so a browser refresh never sees half a page.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- sections: each returns its HTML and writes its PNG (if it has data) ---

def _scores(run: Run, out: Path) -> str:
    rows = run.rows("select round, score from model_judgments order by round")
    by_round: dict[int, list] = defaultdict(list)
    for r in rows:
        by_round[r["round"]].append(r["score"])
    html_ = ["<h2>Judge scores</h2>",
             "<p class=note>Per round, the distribution of the scores the judge gave the candidates "
             "(parsed scores only). Judgments that did not parse never count as a score; their number is "
             "shown separately, with the reasons below.</p>"]
    if not by_round:
        return "\n".join(html_ + [f"<p class=empty>{NO_DATA}</p>"])
    stats = []
    for t, scores in by_round.items():
        parsed = [s for s in scores if s is not None]
        stats.append({"round": t, "n": len(scores), "parsed": len(parsed), "unparsed": len(scores) - len(parsed),
                      "parse_rate": len(parsed) / len(scores),
                      "mean_score": sum(parsed) / len(parsed) if parsed else None})
    fig, axes = _figure(len(by_round), width=4.2, height=3.2)
    parsed_all = [s for scores in by_round.values() for s in scores if s is not None]
    bins = _bins(parsed_all)
    for ax, st in zip(axes, stats):
        parsed = [s for s in by_round[st["round"]] if s is not None]
        if parsed:
            ax.hist(parsed, bins=bins, color=_colour(st["round"]), edgecolor="white")
        else:
            _empty(ax, "no parsed scores")
        ax.set_title(f"round {st['round']}: mean {fmt('mean_score', st['mean_score'])}, "
                     f"parsed {fmt('parse_rate', st['parse_rate'])}\n{st['unparsed']} unparsed", fontsize=9)
        ax.set_xlabel("score")
        ax.set_ylabel("judgments")
    _save(fig, out / "scores.png")
    reasons = run.rows("select round, reason, count(*) n from model_judgments where score is null "
                       "group by round, reason order by round, n desc")
    html_ += [_img("scores.png", "score histogram per round"),
              _table([["round", "judgments", "parsed", "unparsed", "parse%", "mean score"]]
                     + [[str(s["round"]), str(s["n"]), str(s["parsed"]), str(s["unparsed"]),
                         fmt("parse_rate", s["parse_rate"]), fmt("mean_score", s["mean_score"])] for s in stats])]
    if reasons:
        html_ += ["<p>Why judgments did not parse:</p>",
                  _table([["round", "reason", "judgments"]]
                         + [[str(r["round"]), r["reason"] or "-", str(r["n"])] for r in reasons])]
    return "\n".join(html_)


def _pairs(run: Run, out: Path) -> str:
    rows = run.rows("select round, status, count(*) n from pairs group by round, status order by round")
    html_ = ["<h2>Preference pairs</h2>",
             "<p class=note>One row per prompt: <b>kept</b> when the best and worst candidates differ in score; "
             "dropped as <b>tie</b> when all scored candidates tie, or <b>unscored</b> when fewer than two "
             "candidates got a parsed score.</p>"]
    if not rows:
        return "\n".join(html_ + [f"<p class=empty>{NO_DATA}</p>"])
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for r in rows:
        counts[r["round"]][r["status"]] = r["n"]
    rounds = sorted(counts)
    fig, (ax,) = _figure(1, width=6, height=3.5)
    bottom = [0] * len(rounds)
    for status, colour in (("kept", "#2a9d5c"), ("tie", "#e9c46a"), ("unscored", "#c8553d")):
        values = [counts[t].get(status, 0) for t in rounds]
        ax.bar([str(t) for t in rounds], values, bottom=bottom, label=status, color=colour)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("round")
    ax.set_ylabel("prompts")
    ax.legend()
    _save(fig, out / "pairs.png")
    return "\n".join(html_ + [
        _img("pairs.png", "pairs kept and dropped per round"),
        _table([["round", "kept", "tie", "unscored"]]
               + [[str(t)] + [str(counts[t].get(s, 0)) for s in ("kept", "tie", "unscored")] for t in rounds])])


def _lengths(run: Run, out: Path) -> str:
    rows = run.rows(
        "select x.round, avg(x.chosen_tokens) chosen, avg(x.rejected_tokens) rejected, "
        "(select avg(n_tokens) from candidates a where a.round = x.round) candidates from pair_texts x "
        "where x.status = 'kept' group by x.round order by x.round")
    html_ = ["<h2>Response length</h2>",
             "<p class=note>Mean length in tokens of the chosen and rejected responses of the kept pairs. "
             "<b>Length drift is the known reward-hacking signal</b>: a judge that rewards longer answers "
             "makes chosen responses longer than rejected ones, DPO then teaches the next model to write "
             "longer, and the gap compounds round after round. Chosen growing faster than rejected, or every "
             "round's candidates getting longer, is worth a look (see <code>length_rho</code>).</p>"]
    if not rows:
        return "\n".join(html_ + [f"<p class=empty>{NO_DATA}</p>"])
    rounds = [str(r["round"]) for r in rows]
    fig, (ax,) = _figure(1, width=6, height=3.5)
    for key, style in (("chosen", "o-"), ("rejected", "s--"), ("candidates", "^:")):
        ax.plot(rounds, [r[key] for r in rows], style, label=f"{key} (mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("tokens")
    ax.legend()
    _save(fig, out / "lengths.png")
    return "\n".join(html_ + [
        _img("lengths.png", "mean chosen and rejected length per round"),
        _table([["round", "chosen", "rejected", "all candidates", "chosen - rejected"]]
               + [[str(r["round"]), fmt("chosen_len", r["chosen"]), fmt("rejected_len", r["rejected"]),
                   fmt("chosen_len", r["candidates"]), fmt("chosen_len", r["chosen"] - r["rejected"])]
                  for r in rows])])


def _titles(kinds: list[str]) -> str:
    return " / ".join(METHODS[k].title for k in kinds)


def _training(run: Run, out: Path) -> str:
    rows = run.rows("select round, kind, step, loss, rewards_margin, rewards_accuracy from training_steps "
                    "order by round, kind, step")
    html_ = ["<h2>Training</h2>",
             "<p class=note>Per logged step, coloured by round: the SFT loss of round 1, and for DPO the loss, "
             "the reward margin (implicit reward of chosen minus rejected) and the reward accuracy (how often "
             "chosen out-rewards rejected).</p>"]
    if not rows:
        return "\n".join(html_ + [f"<p class=empty>{NO_DATA}</p>"])
    sft, pref = ([k for k, m in METHODS.items() if m.stage == stage] for stage in ("sft", "dpo"))
    panels = [(sft, "loss", _titles(sft) + " loss"), (pref, "loss", _titles(pref) + " loss"),
              (pref, "rewards_margin", "reward margin"), (pref, "rewards_accuracy", "reward accuracy")]
    fig, axes = _figure(4, width=4.5, height=3.2, cols=2)
    for ax, (kinds, key, title) in zip(axes, panels):
        series: dict[int, list] = defaultdict(list)
        for r in rows:
            if r["kind"] in kinds and r[key] is not None:
                series[r["round"]].append((r["step"], r[key]))
        for t, points in sorted(series.items()):
            ax.plot([s for s, _ in points], [v for _, v in points], ".-", color=_colour(t), label=f"round {t}")
        if series:
            ax.legend(fontsize=8)
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            _empty(ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    _save(fig, out / "training.png")
    return "\n".join(html_ + [_img("training.png", f"{_titles(sft)} and {_titles(pref)} training curves")])


def _models(run: Run, out: Path) -> str:
    """Every model of the run with how it was made: method, 4-bit or not, and the merge gap."""
    rows = run.rows("select name, kind, parent, note, detail, merge_gap, sha256 from models order by created_at")
    html_ = ["<h2>Models</h2>",
             "<p class=note>How each model was made. <em>merge gap</em>: the mean absolute difference, in nats, "
             "between the log-probabilities that the trained model (base + adapter, 4-bit for QLoRA) and the "
             "merged full-precision model give the chosen and rejected answers of held-out pairs.</p>"]
    if not rows:
        return "\n".join(html_ + [f"<p class=empty>{NO_DATA}</p>"])
    body = []
    for r in rows:
        detail = json.loads(r["detail"] or "{}")
        body.append([r["name"], r["kind"] or "", r["parent"] or "", detail.get("label", ""),
                     "yes" if detail.get("four_bit") else "no",
                     "-" if r["merge_gap"] is None else f"{r['merge_gap']:.4f}", r["note"] or "",
                     (r["sha256"] or "")[:12]])
    return "\n".join(html_ + [_table([["model", "kind", "parent", "method", "4-bit", "merge gap", "note",
                                       "sha256"]] + body)])


def _actor_quality(run: Run, out: Path) -> str:
    from selfreward.inspection.trend import actor_trend

    trend = actor_trend(run)
    html_ = ["<h2>Actor quality</h2>",
             "<p class=note>Did the loop make the model better? Each model's greedy answers to held-out verifiable "
             "instructions (<code>if_eval</code>, every constraint checked by the IFEval/IFBench checkers; prompt "
             "level counts fully checked prompts only, with the 95% interval) and, with an independent "
             "<code>eval_judge</code>, its win rates against its parent and M1 (raw and length-controlled). "
             "The fixed-answer floor is what one short sentence scores on the same set.</p>"]
    if not trend["rows"]:
        return "\n".join(html_ + [f"<p class=empty>{NO_DATA}</p>"])
    html_.append(_table([["metric", *trend["models"]]] + [[r["metric"], *(r[m] for m in trend["models"])]
                                                         for r in trend["rows"]]))
    for model, reason in trend["promoted"].items():
        if not reason.startswith("promote="):
            html_.append(f"<p class=note>{_e(model)}: {_e(reason)}</p>")
    if trend["verdict"]:
        html_.append(f"<p class={'worse' if trend['worse'] else 'note'}><strong>{_e(trend['verdict'])}</strong></p>")
    fig, (left, right) = _figure(2, width=5.5, height=3.8)
    models, values = trend["models"], trend["values"]
    for ax, names, title in ((left, ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose"),
                              "verifiable instructions"),
                             (right, ("win_vs_prev", "win_lc_vs_prev", "win_vs_m1", "win_lc_vs_m1"), "win rates")):
        plotted = False
        for name in names:
            ys = [values[m].get(name, float("nan")) for m in models]
            if all(y != y for y in ys):
                continue
            lo = [values[m].get(f"{name}_lo", y) for m, y in zip(models, ys)]
            hi = [values[m].get(f"{name}_hi", y) for m, y in zip(models, ys)]
            below = [max(y - a, 0) for y, a in zip(ys, lo)]
            above = [max(b - y, 0) for y, b in zip(ys, hi)]
            ax.errorbar(models, ys, yerr=[below, above], fmt="o-", capsize=3, label=name)
            plotted = True
        if plotted:
            if title == "win rates":
                ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_title(title, fontsize=10)
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        else:
            _empty(ax)
    _save(fig, out / "actor.png")
    html_.append(_img("actor.png", "actor quality per model"))
    return "\n".join(html_)


def _judge_quality(run: Run, out: Path) -> str:
    loop = run.rows("select round, model, name, value from metrics where name like 'eft\\_%' escape '\\' "
                    "order by round, model")
    evals = run.rows("select eval_id, judge, model, dataset, name, value, created_at from eval_metrics "
                     "where kind = 'judge' order by created_at, eval_id")
    html_ = ["<h2>Judge quality</h2>",
             "<p class=note>How well each model judges, where an evaluation was run: in the loop on the held-out "
             "EFT split (<code>eft_eval</code>), and with <code>selfreward eval judge</code> against human "
             "rankings. A judge that gets worse as the rounds go on will pick worse pairs.</p>"]
    if not loop and not evals:
        return "\n".join(html_ + [f"<p class=empty>{NO_DATA}</p>"])
    from selfreward.inspection.trend import judge_trend

    trend = judge_trend(run)
    if trend["rows"]:
        html_ += ["<p>Across rounds, each model as the judge it is after its round (held-out set; bias panels on "
                  "a few of its prompts: position inconsistency as a pairwise judge, the padded answer winning, "
                  "and the gap between its score for its own answer and for the others'):</p>",
                  _table([["metric", *trend["models"]]] + [[r["metric"], *(r[m] for m in trend["models"])]
                                                          for r in trend["rows"]])]
        if trend["verdict"]:
            html_.append(f"<p class={'worse' if trend['worse'] else 'note'}><strong>{_e(trend['verdict'])}"
                         f"</strong></p>")
    per_model: dict[str, dict] = {}
    for r in loop:
        per_model.setdefault(r["model"], {"model": r["model"], "round": r["round"]})[r["name"][4:]] = r["value"]
    per_eval: dict[str, dict] = {}
    for r in evals:
        per_eval.setdefault(r["eval_id"], {k: r[k] for k in ("eval_id", "judge", "model", "dataset",
                                                              "created_at")})[r["name"]] = r["value"]
    fig, (left, right) = _figure(2, width=5.5, height=3.8)
    models = sorted(per_model, key=lambda m: (per_model[m]["round"], m))
    plotted = False
    for name in QUALITY:
        values = [per_model[m].get(name) for m in models]
        if any(v is not None for v in values):
            left.plot(models, [float("nan") if v is None else v for v in values], "o-", label=name)
            plotted = True
    if plotted:
        left.set_title("held-out EFT, per model (eft_*)", fontsize=10)
        left.legend(fontsize=7)
        left.set_xlabel("model (as judge)")
    else:
        _empty(left)
    names = [n for n in QUALITY if any(n in e for e in per_eval.values())]
    if names:
        labels = [f"{e['model']}\n{e['judge']}" for e in per_eval.values()]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(labels))]
            right.bar(xs, [e.get(name, float("nan")) for e in per_eval.values()], width, label=name)
        right.set_xticks(range(len(labels)), labels, fontsize=7)
        right.set_title("selfreward eval judge", fontsize=10)
        right.legend(fontsize=7)
    else:
        _empty(right)
    _save(fig, out / "judge.png")
    html_.append(_img("judge.png", "judge quality metrics"))
    if per_model:
        cols = [("model", "model"), ("round", "round")] + [(k, t) for k, t in EVAL_COLUMNS if k not in
                                                           ("model", "judge", "n_prompts", "judgments_per_s")]
        cols += [("mae", "MAE"), ("n", "examples")]
        cols = [c for c in cols if c[0] in ("model", "round") or any(c[0] in m for m in per_model.values())]
        html_ += ["<p>Held-out EFT (metrics table):</p>",
                  _table([[t for _, t in cols]] + [[_cell(k, per_model[m].get(k)) for k, _ in cols] for m in models])]
    if per_eval:
        cols = [("eval_id", "eval"), *EVAL_COLUMNS, ("dataset", "dataset"), ("created_at", "at")]
        cols = [c for c in cols if any(c[0] in e for e in per_eval.values())]
        html_ += ["<p><code>selfreward eval judge</code> (eval_metrics table):</p>",
                  _table([[t for _, t in cols]] + [[_cell(k, e.get(k)) for k, _ in cols] for e in per_eval.values()])]
    return "\n".join(html_)


# --- helpers ---

def _judge_training(run: Run, out: Path) -> str:
    """Per round: which score built the pairs, how length control moved them, Meta-Rewarding's
    meta-judgments and judge pairs, and CREAM's consistency (from the stages' details)."""
    details: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in run.rows("select round, stage, detail from stages where stage in ('pairs', 'meta')"):
        details[r["round"]][r["stage"]] = json.loads(r["detail"] or "{}")
    html_ = ["<h2>The judge's own training</h2>",
             "<p class=note>Pairs built from the parsed or the expected (logprob-weighted) score; mean length "
             "(characters) of chosen and rejected under the round's length control and under the plain rule "
             "(&rho; = 0); Meta-Rewarding's meta-judgments (how many parsed, how often both orders agreed) and "
             "judge pairs with the mean length of the chosen and rejected judgment; CREAM's mean consistency C "
             "over the kept pairs.</p>"]
    if not details:
        return "\n".join(html_ + [f"<p class=empty>No pairs yet: {NO_DATA}.</p>"])
    head = ["round", "score", "chosen len", "rejected len", "chosen len (ρ=0)", "rejected len (ρ=0)",
            "meta-judgments", "parsed", "both orders agree", "judge pairs", "chosen judgment len",
            "rejected judgment len", "CREAM C (mean)", "pairs with C"]
    rows = [head]
    for t in sorted(details):
        p, m = details[t].get("pairs", {}), details[t].get("meta", {})
        cons = p.get("consistency") or {}
        cells = [t, p.get("score"), p.get("chosen_chars"), p.get("rejected_chars"), p.get("chosen_chars_rho0"),
                 p.get("rejected_chars_rho0"), m.get("meta_judgments"), m.get("parsed"),
                 m.get("position_consistency"), m.get("judge_pairs"), m.get("chosen_judgment_chars"),
                 m.get("rejected_judgment_chars"), cons.get("mean"), cons.get("n")]
        rows.append(["-" if v is None else f"{100 * v:.0f}%" if k == 8 else str(v) for k, v in enumerate(cells)])
    html_.append(_table(rows))
    return "\n".join(html_)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _cell(key: str, value) -> str:
    # Counts come back from SQLite's REAL `value` columns as floats; show them as counts.
    if key in COUNTS and isinstance(value, float) and value.is_integer():
        value = int(value)
    return fmt(key, value)


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    return ("<table><thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in body)
            + "</tbody></table>")


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(src)}" alt="{_e(alt)}">'


def _figure(n: int, width: float, height: float, cols: int | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = cols or n
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    return fig, axes[:n]


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100)


def _empty(ax, text: str = NO_DATA) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888")
    ax.set_xticks([])
    ax.set_yticks([])


def _colour(t: int) -> str:
    # The same round has the same colour in every chart.
    return f"C{t % 10}"


def _bins(scores: list[float]):
    """One bin per integer score for integer scales (the additive 0-5 judge); 20 bins otherwise."""
    if scores and all(float(s).is_integer() for s in scores):
        lo, hi = int(min(scores)), int(max(scores))
        return [x - 0.5 for x in range(lo, hi + 2)]
    return 20
