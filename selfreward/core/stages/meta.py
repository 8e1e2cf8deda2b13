"""Stage (optional, meta_rewarding=yes): Meta-Rewarding (Wu et al. 2024), the judge's
own preference pairs.

Per prompt of the round, the candidate whose K judgments vary most (variance of the
parsed scores) has every two of its judgments compared by a meta-judge, M_{t-1} with
the prompt in templates/meta_judge.txt, in both orders (table `meta_judgments`). A
Bradley-Terry fit of those battles on the Elo scale ranks the judgments; the best
against the worst is a judge-preference pair (table `judge_pairs`): the judge prompt,
the better judgment, the worse one. DPO trains them beside the actor pairs, in the
same step. Everything is stored append-only with the raw output, and `verify`
recomputes the winners and the pairs.

A meta-judge that wrote no `Verdict:` line (a small model trained on the additive rubric
ends with `Score: N` whatever it is asked) is asked for its forced choice where the judge
reads probabilities (judge_logprobs): its own text, then `Verdict: `, and the probabilities
of `A` and `B` as the next token. The battle then counts P(A) / (P(A) + P(B)) as A's share of
a win, so a preference for a position, which both orders share, cancels out. Such rows have
`verdict_from = 'probs'` and their probabilities in `verdict_probs`.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from itertools import combinations
from statistics import pvariance

from selfreward.backends.engines import Sampling
from selfreward.backends.judges import read_logprobs
from selfreward.core.store import now

TEMPLATE = "meta_judge"
# What a battle gives the judgment shown as A: the meta-judge's verdict, position by position.
WON = {"a": 1.0, "b": 0.0, "tie": 0.5}
FORCED = "\n\nVerdict: "  # appended to a meta-judge's text to read its forced choice
CHOICES = ("A", "B")


def share_of_a(m: dict) -> float | None:
    """What a meta-judgment gives the judgment shown as A: 1, 0.5 or 0 for a written verdict,
    P(A) / (P(A) + P(B)) for one read from probabilities; None when it gives nothing."""
    if m.get("verdict_from") == "probs":
        probs = json.loads(m["verdict_probs"])
        total = probs["A"] + probs["B"]
        return probs["A"] / total if total > 0 else None
    return WON.get(m["winner"])


def pick_candidates(judgments: list[dict], limit: int = 0) -> tuple[list[int], dict[int, str]]:
    """Per prompt, the candidate whose parsed judgment scores vary most (ties: lowest id); the
    prompts with the widest spread first, at most `limit` (0 = all). Also why each other
    prompt has none: 'too-few' (no candidate with two parsed judgments) or 'no-spread'."""
    parsed: dict[int, list[float]] = defaultdict(list)
    prompt_of = {}
    for j in judgments:
        prompt_of[j["candidate_id"]] = j["prompt_id"]
        if j["score"] is not None and j["raw"]:
            parsed[j["candidate_id"]].append(j["score"])
    best: dict[int, tuple[float, int]] = {}
    enough = set()  # prompts with a candidate judged (parsed) at least twice
    for cid, scores in sorted(parsed.items()):
        if len(scores) < 2:
            continue
        pid = prompt_of[cid]
        enough.add(pid)
        spread = pvariance(scores)
        if spread > 0 and (pid not in best or spread > best[pid][0]):
            best[pid] = (spread, cid)
    order = sorted(best, key=lambda pid: (-best[pid][0], pid))
    chosen = order[:limit] if limit else order
    skipped = {pid: "no-spread" if pid in enough else "too-few" for pid in set(prompt_of.values()) - set(best)}
    skipped.update({pid: "over meta_max_prompts" for pid in order[len(chosen):]})
    return [best[pid][1] for pid in chosen], skipped


def elo(ids: list[int], battles: list[tuple[int, int, float]], iterations: int = 200) -> dict[int, float]:
    """Bradley-Terry strengths of `ids` from battles (a, b, what a scored: 1, 0.5 or 0), by the
    MM algorithm, on the Elo scale (1000 + 400 log10 of the strength over their geometric mean).
    One virtual tie between every two keeps an unbeaten judgment finite; the result does not
    depend on the battles' order."""
    wins = {i: 0.0 for i in ids}
    games: dict[tuple[int, int], float] = defaultdict(float)
    for a, b in combinations(ids, 2):  # the prior: half a win each
        wins[a] += 0.5
        wins[b] += 0.5
        games[a, b] += 1
        games[b, a] += 1
    for a, b, s in battles:
        wins[a] += s
        wins[b] += 1 - s
        games[a, b] += 1
        games[b, a] += 1
    p = {i: 1.0 for i in ids}
    for _ in range(iterations):
        p = {i: wins[i] / sum(games[i, j] / (p[i] + p[j]) for j in ids if j != i) for i in ids}
        scale = math.exp(sum(math.log(x) for x in p.values()) / len(p))
        p = {i: x / scale for i, x in p.items()}
    return {i: 1000 + 400 * math.log10(x) for i, x in p.items()}


def judge_pair(candidate_id: int, ids: list[int], meta_rows: list[dict]) -> dict:
    """The judge-preference pair of one candidate from its stored meta-judgments."""
    battles = [(m["a_id"], m["b_id"], s) for m in meta_rows if (s := share_of_a(m)) is not None]
    ratings = elo(ids, battles)
    best = max(ids, key=lambda i: (ratings[i], -i))
    worst = min(ids, key=lambda i: (ratings[i], -i))
    row = {"candidate_id": candidate_id, "n_judgments": len(ids), "chosen_id": None, "rejected_id": None,
           "chosen_elo": round(ratings[best], 6), "rejected_elo": round(ratings[worst], 6), "status": "kept",
           "reason": None}
    if not battles:
        row.update(status="unjudged", reason="no meta-judgment parsed")
    elif ratings[best] - ratings[worst] < 1e-6:
        row.update(status="tie", reason="the meta-judge rated the judgments alike")
    else:
        row.update(chosen_id=best, rejected_id=worst)
    return row


def run(ctx, t: int) -> None:
    cfg = ctx.cfg
    if not cfg.meta_rewarding or ctx.run.stage_done(t, "meta"):
        return
    judgments = ctx.run.rows(
        "select j.id, j.candidate_id, j.score, j.raw, c.prompt_id, c.text as response, p.text as instruction "
        "from judgments j join candidates c on c.id = j.candidate_id join prompts p on p.id = c.prompt_id "
        "where j.round = ? and j.judge not like 'human:%' order by j.id", [t])
    candidate_ids, skipped = pick_candidates(judgments, cfg.meta_max_prompts)
    by_candidate: dict[int, list[dict]] = defaultdict(list)
    for j in judgments:
        if j["candidate_id"] in candidate_ids and j["score"] is not None and j["raw"]:
            by_candidate[j["candidate_id"]].append(j)
    template = ctx.template(TEMPLATE)
    jobs = []  # (candidate, judgment shown as A, judgment shown as B, order)
    for cid in candidate_ids:
        for a, b in combinations(by_candidate[cid], 2):
            jobs += [(cid, a, b, "ab"), (cid, b, a, "ba")]
    with ctx.stage(t, "meta") as commit:
        meta_rows = []
        if jobs:
            engine = ctx.judge(ctx.parent(t)).engine  # the self judge's engine: M_{t-1} (a script, in tests)
            prompts = [[{"role": "user", "content": template.render(instruction=a["instruction"], response=a["response"],
                                                                    judgment_a=a["raw"], judgment_b=b["raw"])}]
                       for _, a, b, _ in jobs]
            seed = ctx.seed(t, "meta")
            sampling = Sampling(cfg.judge_temperature, cfg.judge_top_p, cfg.meta_judge_max_new_tokens, seed)
            outs = engine.generate(prompts, 1, sampling, desc="meta-judge")
            stamp, judge_name = now(), ctx.judge(ctx.parent(t)).name
            for (cid, a, b, order), (c,) in zip(jobs, outs):
                parsed = template.parse(c.text, truncated=c.finish_reason == "length") if not c.error else None
                winner = {1.0: "a", 0.0: "b", 0.5: "tie"}.get(parsed.score) if parsed else None
                meta_rows.append({
                    "round": t, "candidate_id": cid, "a_id": a["id"], "b_id": b["id"], "order": order,
                    "winner": winner, "rationale": parsed.rationale if parsed else "",
                    "raw": c.text if not c.error else None,
                    "reason": (parsed.reason if parsed else f"request failed: {c.error}"),
                    "n_tokens": c.n_tokens, "finish_reason": c.finish_reason, "judge": judge_name,
                    "template_sha": template.sha256, "created_at": stamp,
                    "verdict_from": "text" if winner else None, "verdict_probs": None})
            if read_logprobs(cfg) and hasattr(engine, "choice_probs"):
                forced_verdicts(engine, prompts, meta_rows)
        pairs = [{"round": t, "score_spread": round(pvariance([j["score"] for j in by_candidate[cid]]), 6),
                  **judge_pair(cid, [j["id"] for j in by_candidate[cid]],
                               [m for m in meta_rows if m["candidate_id"] == cid])}
                 for cid in candidate_ids]
        commit.insert_all("meta_judgments", meta_rows)
        commit.insert_all("judge_pairs", pairs)
        commit.detail = meta_detail(meta_rows, pairs, skipped, {j["id"]: j["raw"] for j in judgments})


def forced_verdicts(engine, prompts: list, meta_rows: list[dict]) -> None:
    """Each meta-judgment without a written verdict (and whose request did not fail) gets its
    forced choice: the probabilities of A and B after its own text and `Verdict: `."""
    todo = [i for i, m in enumerate(meta_rows) if m["winner"] is None and m["raw"] is not None]
    if not todo:
        return
    texts = [meta_rows[i]["raw"].rstrip() + FORCED + "A" for i in todo]
    probs = engine.choice_probs([prompts[i] for i in todo], texts, [len(x) - 1 for x in texts], CHOICES)
    for i, p in zip(todo, probs):
        if p and p["A"] + p["B"] > 0:
            m = meta_rows[i]
            m.update(verdict_from="probs", verdict_probs=json.dumps(p, sort_keys=True),
                     winner="a" if p["A"] > p["B"] else "b" if p["B"] > p["A"] else "tie",
                     reason=f"{m['reason']}; verdict read from the probabilities of A and B after its text "
                            f"and 'Verdict: ' (A {p['A']:.3f}, B {p['B']:.3f})")


def meta_detail(meta_rows: list[dict], pairs: list[dict], skipped: dict[int, str], raw: dict[int, str]) -> dict:
    """Counts for `status --stages`, the meta-judge's position consistency (both orders of a
    comparison agree), and the mean length of chosen and rejected judgments."""
    orders: dict[tuple, dict[str, str | None]] = defaultdict(dict)
    for m in meta_rows:
        key = (m["candidate_id"],) + tuple(sorted((m["a_id"], m["b_id"])))
        # The winner as a judgment id (or tie), whichever position it was shown in.
        orders[key][m["order"]] = {"a": m["a_id"], "b": m["b_id"], "tie": "tie"}.get(m["winner"])
    both = [o for o in orders.values() if o.get("ab") is not None and o.get("ba") is not None]
    kept = [p for p in pairs if p["status"] == "kept"]
    detail = {"meta_judgments": len(meta_rows), "parsed": sum(m["verdict_from"] == "text" for m in meta_rows),
              "forced": sum(m["verdict_from"] == "probs" for m in meta_rows),
              "candidates": len(pairs), "judge_pairs": len(kept),
              "tie": sum(p["status"] == "tie" for p in pairs), "unjudged": sum(p["status"] == "unjudged" for p in pairs),
              "no_spread": sum(v == "no-spread" for v in skipped.values()),
              "too_few": sum(v == "too-few" for v in skipped.values())}
    if both:
        detail["position_consistency"] = round(sum(o["ab"] == o["ba"] for o in both) / len(both), 4)
    if kept:
        detail["chosen_judgment_chars"] = round(sum(len(raw[p["chosen_id"]]) for p in kept) / len(kept), 1)
        detail["rejected_judgment_chars"] = round(sum(len(raw[p["rejected_id"]]) for p in kept) / len(kept), 1)
    return detail


def judge_training_pairs(ctx, t: int) -> list[dict]:
    """The round's kept judge pairs as DPO rows: the judge prompt the judgments answered (the
    additive template, rendered as the judging stage rendered it), the better and the worse one."""
    rows = ctx.run.rows(
        "select p.text as instruction, c.text as response, jc.raw as chosen, jr.raw as rejected "
        "from judge_pairs x join candidates c on c.id = x.candidate_id join prompts p on p.id = c.prompt_id "
        "join judgments jc on jc.id = x.chosen_id join judgments jr on jr.id = x.rejected_id "
        "where x.round = ? and x.status = 'kept' order by x.id", [t])
    template = ctx.template("additive_judge")
    return [{"prompt": template.render(instruction=r["instruction"], response=r["response"]), "chosen": r["chosen"],
             "rejected": r["rejected"], "kind": "judge"} for r in rows]
