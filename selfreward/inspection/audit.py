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
    judgment with no raw text (PairRM, a reward model, a failed request, a human
    label) or one made with a template this version does not have."""
    counts = counts if counts is not None else {}
    # 0. The triggers that make the evidence append-only are still in place.
    problems = _verify_triggers(run)
    # 1. Each stored score must be what its stored raw text parses to, under the template that made it.
    templates = _templates_by_sha()
    found, checked, unknown_template = _reread(run, "judgments", templates)
    problems += found
    found, summaries = _verify_comparisons(run, templates, counts)
    problems += found
    found, counts["consistency_checked"], _ = _reread(run, "consistency_judgments", templates)
    problems += found
    problems += _verify_eval_comparisons(run, templates, counts)
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
    counts.update({"judgments": run.db["judgments"].count, "judgments_checked": checked + summaries,
                   "judgments_unknown_template": unknown_template,
                   "judgments_without_raw": run.db["judgments"].count_where(
                       "(raw is null and judge not like '%/pairwise') or judge like 'human:%'"),
                   "pairs": run.db["pairs"].count})
    # 2. Each round's pairs must follow from the stored scores by the stored pairing rule.
    for (t,) in run.db.execute("select distinct round from pairs order by round").fetchall():
        stored = run.rows("select * from pairs where round = ? order by prompt_id", [t])
        rules = {p["rule"] for p in stored}
        rho = _rule_rho(rules.pop()) if len(rules) == 1 else None
        if rho is None:
            problems.append(f"round {t}: unknown pairing rule {sorted(p['rule'] for p in stored)[:1]}")
            continue
        cands = run.rows("select id, prompt_id, text from candidates where round = ?", [t])
        judgments = run.rows("select candidate_id, score, expected_score from model_judgments where round = ?",
                             [t])
        kind = {p["score_kind"] for p in stored} - {None}  # NULL: written before pair_score existed
        score_key = "expected_score" if kind == {"expected"} else "score"
        expected = {p["prompt_id"]: p for p in build_pairs(cands, judgments, rho, score_key)}
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


# A pairwise LLM judge's per-sample score: no raw text of its own, it follows from the round's comparisons.
PAIRWISE_SUMMARY = "(j.raw is null and j.judge like '%/pairwise')"


def _rule_rho(rule: str) -> float | None:
    """rho of a stored pairing rule, 'max-min rho=<float>' as Python writes the float (0.0, 1e-05)."""
    m = re.fullmatch(r"max-min rho=(\S+)", rule or "")
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


def _verify_triggers(run: Run) -> list[str]:
    from selfreward.core.store import APPEND_ONLY, APPEND_ONLY_M009, APPEND_ONLY_M011, append_only_triggers

    stored = dict(run.db.execute("select name, sql from sqlite_master where type = 'trigger'").fetchall())
    problems = []
    for table in APPEND_ONLY + APPEND_ONLY_M009 + APPEND_ONLY_M011:
        for name, sql in append_only_triggers(table).items():
            if name not in stored:
                problems.append(f"trigger {name} is missing: the rows of {table} are no longer append-only")
            elif " ".join(stored[name].split()) != " ".join(sql.split()):
                problems.append(f"trigger {name} has been changed: the rows of {table} may have been edited")
    return problems


def _reread(run: Run, table: str, templates: dict) -> tuple[list[str], int, int]:
    """Re-read each stored score of `table` (judgments, consistency_judgments) from its raw text, as
    the judge read it: the same parser, and the same refusal of a score line copied from the response."""
    from selfreward.backends.judges.llm import read_verdict

    problems, checked, unknown = [], 0, 0
    what = "judgment" if table == "judgments" else "consistency judgment"
    for j in run.rows(f"select j.id, j.score, j.raw, j.template_sha, j.finish_reason, c.text as response "
                      f"from {table} j join candidates c on c.id = j.candidate_id "
                      f"where j.raw is not null and j.judge not like 'human:%' order by j.id"):
        t = templates.get(j["template_sha"])
        if t is None:
            unknown += 1
            continue
        checked += 1
        parsed = read_verdict(t, j["raw"], j["finish_reason"], j["response"]).score
        if not _same(parsed, j["score"]):
            problems.append(f"{what} {j['id']}: stored score {j['score']} but its raw text parses to {parsed}")
    return problems, checked, unknown


def _verify_comparisons(run: Run, templates: dict, counts: dict) -> tuple[list[str], int]:
    """Pairwise judging: each comparison's two verdicts are what their raw texts parse to, its outcome
    follows from them, and each pairwise summary score follows from the comparisons of its sample.
    Returns the problems and how many summary scores were recomputed."""
    from collections import defaultdict

    from selfreward.backends.judges.llm import pair_outcome, pairwise_score, read_verdict

    problems, checked = [], 0
    by_sample = defaultdict(list)
    for x in run.rows("select * from comparisons order by id"):
        by_sample[(x["round"], x["prompt_id"], x["judge"], x["sample"])].append((x["a_id"], x["b_id"], x["outcome"]))
        t = templates.get(x["template_sha"])
        if t is None:
            continue  # PairRM: logits, no text
        checked += 1
        for side in ("ab", "ba"):
            raw, score = x[f"{side}_raw"], x[f"{side}_score"]
            # A comparison row keeps no finish_reason: a reading as cut off at the token limit counts too.
            readings = [None] if raw is None else [read_verdict(t, raw).score, read_verdict(t, raw, "length").score]
            if not any(_same(score, r) for r in readings):
                problems.append(f"comparison {x['id']}: stored {side} verdict {score} but its raw text parses to "
                                f"{readings[0]}")
        again = pair_outcome(x["ab_score"], x["ba_score"])
        if again != x["outcome"]:
            problems.append(f"comparison {x['id']}: stored outcome {x['outcome']!r}, recomputed {again!r}")
    counts["comparisons_checked"] = checked
    summaries = run.rows(f"select j.id, j.round, j.judge, j.sample, j.candidate_id, j.score, c.prompt_id "
                         f"from judgments j join candidates c on c.id = j.candidate_id where {PAIRWISE_SUMMARY}")
    for j in summaries:
        again = pairwise_score(by_sample.get((j["round"], j["prompt_id"], j["judge"], j["sample"]), []),
                               j["candidate_id"]).score
        if not _same(again, j["score"]):
            problems.append(f"judgment {j['id']}: stored pairwise score {j['score']} but its comparisons give "
                            f"{again}")
    return problems, len(summaries)


def _verify_eval_comparisons(run: Run, templates: dict, counts: dict) -> list[str]:
    """The actor's win rates: each comparison by the eval judge is what its raw texts (an LLM judge, in
    both orders) or its two scores (a reward model) imply, down to the preference that was counted."""
    from selfreward.backends.judges.llm import outcome_preference as preference, pair_outcome, read_verdict

    problems, checked = [], 0
    for x in run.rows("select * from eval_comparisons order by id"):
        t = templates.get(x["template_sha"])
        if t is not None:
            ab, ba = (read_verdict(t, x[f"{side}_raw"]).score if x[f"{side}_raw"] is not None else None
                      for side in ("ab", "ba"))
            outcome = pair_outcome(ab, ba)
        elif x["template_sha"] is None and x["ab_raw"] is None:  # a scorer: the higher score wins
            ab, ba = x["ab_score"], x["ba_score"]
            outcome = "unparsed" if ab is None or ba is None else "a" if ab > ba else "b" if ab < ba else "tie"
        else:
            continue  # a template this version does not have
        checked += 1
        again = preference(outcome)
        if not (_same(ab, x["ab_score"]) and _same(ba, x["ba_score"]) and _same(again, x["preference"])):
            problems.append(f"eval comparison {x['id']}: stored verdicts {x['ab_score']}/{x['ba_score']} and "
                            f"preference {x['preference']}, but its judge texts give {ab}/{ba} and {again}")
    counts["eval_comparisons_checked"] = checked
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
        left join (select candidate_id, max(score) - min(score) as spread from judgments
              where judge not like 'human:%' group by candidate_id) s on s.candidate_id = j.candidate_id
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
    from selfreward.inspection.status import table, terminal_safe

    def cut(text):
        text = " ".join((text or "").split())
        return text if len(text) <= width else text[: width - 1] + "…"

    shown = [{**r, "rationale": cut(r["rationale"] or r["reason"]), "response": cut(r["response"])} for r in rows]
    cols = [(c, c) for c in columns if c != "reason"]
    return terminal_safe(table(shown, cols)) + "\n"
