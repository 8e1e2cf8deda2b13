"""Read-only views of a run: the per-round summary (`status`) and one prompt's
full judging record (`show`)."""

from __future__ import annotations

import json
import re
import textwrap

from selfreward.errors import SelfRewardError
from selfreward.core.store import Run
from selfreward.training.methods import METHODS


# Control characters (ANSI escapes, carriage returns, C1 codes) and bidi overrides in model text would act on
# the auditor's terminal: shown as escapes instead. The stored text is left as it was.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _one(run: Run, sql: str, params=()):
    return run.db.execute(sql, params).fetchone()[0]


def round_summary(run: Run) -> list[dict]:
    out = []
    for r in run.rows("select * from rounds order by round"):
        t = r["round"]
        judged = run.rows("select count(*) n, count(score) parsed, avg(score) mean from model_judgments "
                          "where round=?", [t])[0]
        pairs = {row["status"]: row["n"] for row in
                 run.rows("select status, count(*) n from pairs where round=? group by status", [t])}
        kind = _method(run, t)
        train = run.rows(
            "select avg(loss) loss, avg(rewards_margin) margin, avg(rewards_accuracy) acc, count(*) steps "
            f"from training_steps where round=? and kind in ({', '.join('?' * len(METHODS))})", [t, *METHODS])[0]
        lengths = run.rows(
            "select avg(chosen_tokens) chosen, avg(rejected_tokens) rejected from pair_texts "
            "where round=? and status='kept'", [t])[0]
        parse = run.db.execute("select value from metrics where round=? and model=? and name='eft_parse_rate'",
                               [t, f"M{t}"]).fetchone()
        out.append({
            "round": t, "model": f"{r['model_in']}->{r['model_out']}",
            "done": bool(r["finished_at"]),
            "prompts": _one(run, "select count(*) from prompts where round=?", [t]),
            "candidates": _one(run, "select count(*) from candidates where round=?", [t]),
            "judgments": judged["n"],
            "parse_rate": judged["parsed"] / judged["n"] if judged["n"] else None,
            "mean_score": judged["mean"],
            "pairs_kept": pairs.get("kept", 0), "dropped_tie": pairs.get("tie", 0),
            "dropped_unscored": pairs.get("unscored", 0),
            "train": kind, "train_steps": train["steps"], "loss": train["loss"],
            "merge_gap": _one(run, "select max(merge_gap) from models where name=?", [f"M{t}"]),
            "reward_margin": train["margin"], "reward_acc": train["acc"],
            "fit_acc": _model(run, f"M{t}")[1].get("fit_accuracy"),
            "chosen_len": lengths["chosen"], "rejected_len": lengths["rejected"],
            "eft_parse_rate": parse[0] if parse else None,
            "wall_s": r["wall_s"] if r["finished_at"] else _one(run, "select sum(wall_s) from stages where round=?", [t]),
        })
    return out


def _model(run: Run, name: str) -> tuple[str | None, dict]:
    """A models row's kind and detail (what its training and merge recorded); (None, {}) for a
    model not trained yet."""
    row = run.db.execute("select kind, detail from models where name=?", [name]).fetchone()
    return (row[0], json.loads(row[1] or "{}")) if row else (None, {})


def _method(run: Run, t: int) -> str:
    """How M_t was trained, as its models row says: 'dpo', 'dpo:ipo', 'simpo', with '+4bit' for QLoRA."""
    kind, detail = _model(run, f"M{t}")
    if kind is None:  # not trained yet
        return "sft" if t == 1 else run.config_values().get("train_method", "dpo")
    if kind == "copy":
        return "copy"
    return detail.get("label", kind.split("-")[0]) + ("+4bit" if detail.get("four_bit") else "")


COLUMNS = [("round", "round"), ("model", "model"), ("prompts", "prompts"), ("candidates", "cands"),
           ("judgments", "judged"), ("parse_rate", "parse%"), ("mean_score", "score"),
           ("pairs_kept", "kept"), ("dropped_tie", "tie"), ("dropped_unscored", "unscored"),
           ("train", "train"), ("loss", "loss"), ("reward_margin", "margin"), ("reward_acc", "acc"),
           ("fit_acc", "acc after"), ("merge_gap", "merge gap"), ("chosen_len", "len+"), ("rejected_len", "len-"),
           ("eft_parse_rate", "EFT parse%"),
           ("wall_s", "wall")]


EVAL_COLUMNS = [("model", "model"), ("judge", "judge"), ("n_prompts", "prompts"), ("parse_rate", "parse%"),
                ("pairwise_accuracy", "pair acc"), ("pairwise_ties", "ties"), ("five_best", "5-best"),
                ("exact_match", "exact"), ("spearman", "spearman"), ("kendall_tau", "kendall"),
                ("expected_pairwise_accuracy", "E pair acc"), ("expected_pairwise_ties", "E ties"),
                ("expected_spearman", "E spearman"),
                ("position_inconsistency", "pos-incons"), ("verbosity_padded_wins", "padded wins"),
                ("canary_moved", "canary moved"), ("canary_copied_scores", "copied"), ("judgments_per_s", "judg/s")]
H2H_COLUMNS = [("a", "A"), ("b", "B"), ("judge", "judge"), ("n", "prompts"), ("wins", "A wins"), ("ties", "ties"),
               ("losses", "A losses"), ("inconsistent", "inconsistent"), ("unscored", "unscored"),
               ("win_rate", "A win rate"), ("win_lo", "lo"), ("win_hi", "hi"), ("win_lc", "A LC win rate"),
               ("win_lc_lo", "LC lo"), ("win_lc_hi", "LC hi"), ("a_mean_tokens", "A len"), ("b_mean_tokens", "B len")]
IF_COLUMNS = [("model", "model"), ("n", "prompts"), ("if_checked", "checked"), ("if_unchecked", "unchecked"),
              ("if_prompt_strict", "prompt strict"), ("if_prompt_strict_lo", "lo"), ("if_prompt_strict_hi", "hi"),
              ("if_prompt_loose", "prompt loose"), ("if_inst_strict", "inst strict"), ("if_inst_loose", "inst loose"),
              ("if_floor", "floor")]
PERCENT = {"canary_moved", "canary_raised", "eft_expected_pairwise_accuracy", "eft_expected_pairwise_ties",
           "eft_parse_rate", "exact_match", "expected_coverage", "expected_pairwise_accuracy",
           "expected_pairwise_ties", "fit_acc", "five_best", "if_floor", "if_inst_loose", "if_inst_strict",
           "if_prompt_loose", "if_prompt_strict", "if_prompt_strict_hi", "if_prompt_strict_lo",
           "pairwise_accuracy", "pairwise_ties", "parse_rate", "position_inconsistency", "reward_acc",
           "verbosity_padded_wins", "win_hi", "win_lc", "win_lc_hi", "win_lc_lo", "win_lo", "win_rate"}


def fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if key in PERCENT:
        return f"{100 * value:.0f}%"
    if key == "wall_s":
        return f"{value / 60:.1f}m" if value >= 60 else f"{value:.0f}s"
    if key in ("chosen_len", "rejected_len", "a_mean_tokens", "b_mean_tokens"):
        return f"{value:.0f}"
    if isinstance(value, float):
        if key == "merge_gap":
            return f"{value:.2g}"
        return f"{value:.3f}" if key in ("loss", "reward_margin") else f"{value:.2f}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]], free_last: bool = False) -> str:
    """Right-aligned columns; with `free_last`, the last column (free text such as a stage's
    detail) is written as it is after the others, not padded to its longest cell."""
    cells = [[title for _, title in columns]] + [[fmt(k, r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if free_last:
        widths[-1] = len(columns[-1][1])
    padded = len(columns) - 1 if free_last else len(columns)
    lines = ["  ".join([*(c.rjust(w) for c, w in zip(row[:padded], widths)), *row[padded:]]) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_summary(run: Run) -> list[dict]:
    return run.rows("select round, stage, wall_s, peak_rss_mb, detail from stages order by round, rowid")


def show_prompt(run: Run, prompt_id: int | None) -> str:
    if prompt_id is None:
        row = run.db.execute("select prompt_id from pairs where status='kept' order by id limit 1").fetchone() \
            or run.db.execute("select id from prompts order by id limit 1").fetchone()
        if row is None:
            raise SelfRewardError("this run has no prompts yet")
        prompt_id = row[0]
    prompt = run.rows("select * from prompts where id=?", [prompt_id])
    if not prompt:
        raise SelfRewardError(f"no prompt with id {prompt_id} in this run")
    p = prompt[0]
    pair = run.rows("select * from pairs where prompt_id=?", [prompt_id])
    pair = pair[0] if pair else {}
    lines = [f"prompt {p['id']} (round {p['round']}, {p['source']})", _indent(p["text"]), ""]
    if pair:
        lines.append(f"pair: {pair['status']}" + (
            f" (chosen {pair['chosen_id']} {pair['chosen_score']:.2f} vs rejected {pair['rejected_id']} "
            f"{pair['rejected_score']:.2f})" if pair["status"] == "kept" else "") + f", rule {pair['rule']}")
        lines.append("")
    for c in run.rows("select * from candidates where prompt_id=? order by idx", [prompt_id]):
        js = run.rows("select * from judgments where candidate_id=? order by sample", [c["id"]])
        # Human labels (import-labels) are listed, but the mean is the model judge's, as pairs saw it.
        scores = [j["score"] for j in js if j["score"] is not None and not j["judge"].startswith("human:")]
        mean = f"{sum(scores) / len(scores):.2f}" if scores else "unscored"
        tag = {pair.get("chosen_id"): "  [CHOSEN]", pair.get("rejected_id"): "  [REJECTED]"}.get(c["id"], "")
        lines.append(f"candidate {c['id']} (#{c['idx']}, {c['n_tokens']} tokens, {c['finish_reason']}): "
                     f"mean score {mean}{tag}")
        lines.append(_indent(c["text"]))
        for j in js:
            verdict = f"score {j['score']:.0f}" if j["score"] is not None else f"NO SCORE ({j['reason']})"
            if j.get("expected_score") is not None:
                verdict += f" (expected {j['expected_score']:.2f} from the score tokens' probabilities)"
            lines.append(f"    judge sample {j['sample']} [{j['judge']}] (judgment {j['id']}): {verdict}")
            lines.append(_indent(j["rationale"] or j["raw"] or "(empty)", 8))
        lines += _meta_lines(run, c["id"])
        lines.append("")
    return terminal_safe("\n".join(lines).rstrip() + "\n")


def _meta_lines(run: Run, candidate_id: int) -> list[str]:
    """Meta-Rewarding on one candidate: each meta-judgment, and the judge pair it made."""
    metas = run.rows("select * from meta_judgments where candidate_id = ? order by id", [candidate_id])
    if not metas:
        return []
    lines = []
    for m in metas:
        winner = {"a": f"judgment {m['a_id']}", "b": f"judgment {m['b_id']}", "tie": "tie"}.get(
            m["winner"], f"NO VERDICT ({m['reason']})")
        if m.get("verdict_from") == "probs":
            p = json.loads(m["verdict_probs"])
            winner += f" (forced choice: no Verdict line; P(A) {p['A']:.3f}, P(B) {p['B']:.3f})"
        lines.append(f"    meta-judge [{m['judge']}]: judgment {m['a_id']} (shown as A) vs {m['b_id']} (B): {winner}")
        lines.append(_indent(m["rationale"] or m["raw"] or "(empty)", 8))
    for p in run.rows("select * from judge_pairs where candidate_id = ?", [candidate_id]):
        lines.append(f"    judge pair: {p['status']}" + (
            f", chosen judgment {p['chosen_id']} (Elo {p['chosen_elo']:.0f}) over {p['rejected_id']} "
            f"(Elo {p['rejected_elo']:.0f})" if p["status"] == "kept" else f" ({p['reason']})"))
    return lines


def show_pair(run: Run, pair_id: int) -> str:
    """One pair for an auditor: the prompt, chosen and rejected, and every judge sample of each side."""
    rows = run.rows("select * from pairs where id=?", [pair_id])
    if not rows:
        raise SelfRewardError(f"no pair with id {pair_id} in this run")
    pair = rows[0]
    prompt = run.rows("select * from prompts where id=?", [pair["prompt_id"]])[0]
    lines = [f"pair {pair_id} (round {pair['round']}): {pair['status']}, rule {pair['rule']}",
             f"prompt {prompt['id']} ({prompt['source']})", _indent(prompt["text"]), ""]
    if pair["status"] != "kept":
        lines.append(f"no chosen/rejected: {pair['n_scored']} candidates scored, {pair['n_unscored']} unscored")
        return terminal_safe("\n".join(lines) + "\n")
    lines.append(f"margin {pair['chosen_score'] - pair['rejected_score']:.2f}")
    for side in ("chosen", "rejected"):
        c = run.rows("select * from candidates where id=?", [pair[f"{side}_id"]])[0]
        lines += ["", f"{side.upper()}: candidate {c['id']} ({c['n_tokens']} tokens), mean score "
                      f"{pair[f'{side}_score']:.2f}", _indent(c["text"])]
        for j in run.rows("select * from judgments where candidate_id=? order by sample", [c["id"]]):
            verdict = f"score {j['score']:g}" if j["score"] is not None else f"NO SCORE ({j['reason']})"
            lines.append(f"    judge sample {j['sample']} [{j['judge']}]: {verdict}")
            lines.append(_indent(j["rationale"] or j["raw"] or "(empty)", 8))
    return terminal_safe("\n".join(lines) + "\n")


def _indent(text: str, n: int = 4) -> str:
    return "\n".join(textwrap.indent(textwrap.fill(para, 100 - n) if para else "", " " * n)
                     for para in text.splitlines()) or " " * n + "(empty)"
