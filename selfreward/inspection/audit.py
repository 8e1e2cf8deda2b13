"""Auditing: recompute what the judge decided (`verify`) and find the judgments
worth reading (`rationales`)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from selfreward.config import PROMPTS_DIR
from selfreward.prompts import load_template
from selfreward.core.stages.pairs import build_pairs
from selfreward.core.store import Run


def _templates_by_sha() -> dict:
    out = {}
    for path in sorted(Path(PROMPTS_DIR).glob("*.txt")):
        t = load_template(str(path))
        if t.parser != "instruction":
            out[t.sha256] = t
    return out


def verify(run: Run, counts: dict | None = None) -> list[str]:
    """Every mismatch between the stored pairs and what the stored judgments imply.

    `counts`, if given, is filled with what was checked and what could not be: a
    judgment with no raw text (a pairwise summary, PairRM, a reward model, a failed
    request, a human label) or one made with a template this version does not have."""
    problems = []
    counts = counts if counts is not None else {}
    # 1. Each stored score must be what its stored raw text parses to, under the template that made it.
    templates = _templates_by_sha()
    checked = unknown_template = 0
    for j in run.rows("select id, score, raw, template_sha, finish_reason from model_judgments "
                      "where raw is not null"):
        t = templates.get(j["template_sha"])
        if t is None:
            unknown_template += 1
            continue
        checked += 1
        parsed = t.parse(j["raw"], truncated=j["finish_reason"] == "length").score
        if parsed != j["score"]:
            problems.append(f"judgment {j['id']}: stored score {j['score']} but its raw text parses to {parsed}")
    # 0. Every model folder the run recorded still holds the weights it recorded.
    from selfreward.backends.models import check_weights
    from selfreward.errors import SelfRewardError

    models_checked = 0
    for m in run.rows("select name from models order by round, name"):
        model = run.model(m["name"])
        if model["sha256"] is None or not Path(model["path"]).is_absolute():
            continue  # a hub id: nobody here hashed it
        models_checked += 1
        try:
            check_weights(model["name"], Path(model["path"]), model["sha256"], full=True)
        except SelfRewardError as e:
            problems.append(str(e))
    counts["models_checked"] = models_checked
    counts.update({"judgments": run.db["judgments"].count, "judgments_checked": checked,
                   "judgments_unknown_template": unknown_template,
                   "judgments_without_raw": run.db["judgments"].count_where("raw is null or judge like 'human:%'"),
                   "pairs": run.db["pairs"].count})
    # 2. Each round's pairs must follow from the stored scores by the stored pairing rule.
    for (t,) in run.db.execute("select distinct round from pairs order by round").fetchall():
        stored = run.rows("select * from pairs where round = ? order by prompt_id", [t])
        rules = {p["rule"] for p in stored}
        if len(rules) != 1 or not (m := re.fullmatch(r"max-min rho=([0-9.]+)", rules.pop())):
            problems.append(f"round {t}: unknown pairing rule {sorted(p['rule'] for p in stored)[:1]}")
            continue
        cands = run.rows("select id, prompt_id, text from candidates where round = ?", [t])
        judgments = run.rows("select candidate_id, score, expected_score from model_judgments where round = ?",
                             [t])
        kind = {p["score_kind"] for p in stored} - {None}  # NULL: written before pair_score existed
        score_key = "expected_score" if kind == {"expected"} else "score"
        expected = {p["prompt_id"]: p for p in build_pairs(cands, judgments, float(m.group(1)), score_key)}
        for p in stored:
            e = expected.pop(p["prompt_id"], None)
            if e is None:
                problems.append(f"pair {p['id']} (round {t}): prompt {p['prompt_id']} has no judged candidates")
                continue
            for key in ("status", "chosen_id", "rejected_id", "chosen_score", "rejected_score"):
                if not _same(p[key], e[key]):
                    problems.append(f"pair {p['id']} (round {t}, prompt {p['prompt_id']}): stored {key}="
                                    f"{p[key]!r}, recomputed {e[key]!r}")
        for prompt_id in expected:
            problems.append(f"round {t}: prompt {prompt_id} was judged but has no pair row")
        problems += _verify_consistency(run, t, stored, cands, judgments, score_key)
    problems += _verify_expected(run, counts)
    problems += _verify_meta(run, templates, counts)
    return problems


def _verify_expected(run: Run, counts: dict) -> list[str]:
    """A stored expected score is the expected value of its stored score probabilities."""
    from selfreward.backends.judges.llm import expected_score

    problems, n = [], 0
    for j in run.rows("select id, expected_score, score_probs from judgments where score_probs is not null"):
        n += 1
        again = expected_score(json.loads(j["score_probs"]))
        if not _same(again, j["expected_score"]):
            problems.append(f"judgment {j['id']}: stored expected score {j['expected_score']} but its stored "
                            f"probabilities give {again}")
    counts["expected_checked"] = n
    return problems


def _verify_consistency(run: Run, t: int, stored: list[dict], cands: list[dict], judgments: list[dict],
                        key: str) -> list[str]:
    """CREAM: each pair's consistency follows from the two judges' stored judgments."""
    if all(p["consistency"] is None for p in stored):
        return []
    from selfreward.core.stages.consistency import consistency_by_prompt

    prior = run.rows("select candidate_id, score, expected_score from consistency_judgments where round = ?", [t])
    again = consistency_by_prompt(cands, judgments, prior, key)
    return [f"pair {p['id']} (round {t}): stored consistency {p['consistency']!r}, recomputed "
            f"{again.get(p['prompt_id'])!r}" for p in stored if p["status"] == "kept"
            and not _same(p["consistency"], again.get(p["prompt_id"]))]


def _verify_meta(run: Run, templates: dict, counts: dict) -> list[str]:
    """Meta-Rewarding: each meta-judgment's winner is what its raw text parses to, and each judge
    pair follows from the stored meta-judgments by the Elo rule."""
    from selfreward.core.stages.meta import judge_pair, share_of_a

    problems, checked = [], 0
    for m in run.rows("select id, winner, verdict_from, verdict_probs, raw, template_sha, finish_reason "
                      "from meta_judgments where raw is not null"):
        t = templates.get(m["template_sha"])
        if t is None:
            continue
        checked += 1
        score = t.parse(m["raw"], truncated=m["finish_reason"] == "length").score
        winner = {1.0: "a", 0.0: "b", 0.5: "tie"}.get(score)
        if m["verdict_from"] == "probs" and winner is None:
            # No written verdict: the stored one must be the likelier of A and B by its stored probabilities.
            share = share_of_a(m)
            winner = None if share is None else "a" if share > 0.5 else "b" if share < 0.5 else "tie"
            source = "its stored probabilities give"
        else:
            source = "its raw text gives"
        if winner != m["winner"]:
            problems.append(f"meta-judgment {m['id']}: stored winner {m['winner']!r} but {source} {winner!r}")
    counts["meta_judgments_checked"] = checked
    for p in run.rows("select * from judge_pairs order by id"):
        ids = [r["id"] for r in run.rows("select id from model_judgments where candidate_id = ? and round = ? and score "
                                         "is not null and raw is not null and raw != '' order by id", [p["candidate_id"], p["round"]])]
        metas = run.rows("select a_id, b_id, winner, verdict_from, verdict_probs from meta_judgments "
                         "where candidate_id = ? and round = ?",
                         [p["candidate_id"], p["round"]])
        again = judge_pair(p["candidate_id"], ids, metas)
        for key in ("status", "chosen_id", "rejected_id"):
            if again[key] != p[key]:
                problems.append(f"judge pair {p['id']} (round {p['round']}): stored {key}={p[key]!r}, "
                                f"recomputed {again[key]!r}")
    return problems


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) < 1e-9
    return a == b


RATIONALE_COLUMNS = ["judgment_id", "round", "prompt_id", "candidate_id", "sample", "judge", "score", "spread",
                     "margin", "reason", "rationale", "response"]


def rationales(run: Run, round: int | None = None, min_score: float | None = None, max_score: float | None = None,
               min_spread: float | None = None, failures: bool = False, min_margin: float | None = None,
               search: str | None = None, limit: int = 0) -> list[dict]:
    """Judgments with their candidate's response, filtered as an auditor asks."""
    where, params = [], []
    if round is not None:
        where.append("j.round = ?")
        params.append(round)
    if min_score is not None:
        where.append("j.score >= ?")
        params.append(min_score)
    if max_score is not None:
        where.append("j.score <= ?")
        params.append(max_score)
    if min_spread is not None:
        where.append("s.spread >= ?")
        params.append(min_spread)
    if failures:
        where.append("j.score is null")
    if min_margin is not None:
        where.append("pm.margin >= ?")
        params.append(min_margin)
    if search:
        where.append("(j.id in (select rowid from judgments_fts where judgments_fts match ?) "
                     "or c.id in (select rowid from candidates_fts where candidates_fts match ?))")
        params += [search, search]
    sql = f"""
        select j.id as judgment_id, j.round, c.prompt_id, j.candidate_id, j.sample, j.judge, j.score,
               s.spread, pm.margin, j.reason, j.rationale, c.text as response
        from judgments j
        join candidates c on c.id = j.candidate_id
        join (select candidate_id, max(score) - min(score) as spread from judgments
              group by candidate_id) s on s.candidate_id = j.candidate_id
        left join (select chosen_id as cid, chosen_score - rejected_score as margin from pairs where status = 'kept'
                   union all
                   select rejected_id, chosen_score - rejected_score from pairs where status = 'kept') pm
               on pm.cid = j.candidate_id
        {"where " + " and ".join(where) if where else ""}
        order by j.round, c.prompt_id, j.candidate_id, j.sample
        {"limit " + str(int(limit)) if limit else ""}"""
    import sqlite3

    try:
        return run.rows(sql, params)
    except sqlite3.OperationalError as e:
        from selfreward.errors import SelfRewardError

        raise SelfRewardError(f"bad --search query {search!r}: {e} (SQLite FTS5 syntax)") from None


META_COLUMNS = ["meta_id", "round", "prompt_id", "candidate_id", "a_id", "b_id", "winner", "verdict_from",
                "pair_role", "reason", "rationale", "response"]


def meta_rationales(run: Run, round: int | None = None, search: str | None = None, limit: int = 0) -> list[dict]:
    """Meta-judgments (Meta-Rewarding) with the candidate whose judgments they compared; pair_role
    says whether judgment A ended up chosen or rejected in the candidate's judge pair."""
    where, params = [], []
    if round is not None:
        where.append("m.round = ?")
        params.append(round)
    if search:
        where.append("m.id in (select rowid from meta_judgments_fts where meta_judgments_fts match ?)")
        params.append(search)
    sql = f"""
        select m.id as meta_id, m.round, c.prompt_id, m.candidate_id, m.a_id, m.b_id, m.winner, m.verdict_from,
               case m.a_id when x.chosen_id then 'A chosen' when x.rejected_id then 'A rejected' end as pair_role,
               m.reason, m.rationale, c.text as response
        from meta_judgments m join candidates c on c.id = m.candidate_id
        left join judge_pairs x on x.candidate_id = m.candidate_id and x.round = m.round
        {"where " + " and ".join(where) if where else ""}
        order by m.round, m.candidate_id, m.id
        {"limit " + str(int(limit)) if limit else ""}"""
    import sqlite3

    try:
        return run.rows(sql, params)
    except sqlite3.OperationalError as e:
        from selfreward.errors import SelfRewardError

        raise SelfRewardError(f"bad --search query {search!r}: {e} (SQLite FTS5 syntax)") from None


def render(rows: list[dict], fmt: str, width: int = 60, columns: list[str] = RATIONALE_COLUMNS) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    from selfreward.inspection.status import table

    def cut(text):
        text = " ".join((text or "").split())
        return text if len(text) <= width else text[: width - 1] + "…"

    shown = [{**r, "rationale": cut(r["rationale"] or r["reason"]), "response": cut(r["response"])} for r in rows]
    cols = [(c, c) for c in columns if c != "reason"]
    return table(shown, cols) + "\n"
