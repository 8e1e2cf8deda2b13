"""OpenAssistant data in, the paper's seed sets out.

IFT is each first-turn prompt with its human rank-0 reply. The ranked EFT eval
set is each first-turn prompt with >= 2 ranked replies, in the format that
`evaluation.judge_quality.load_eval_set` reads. EFT training targets (justification +
score) come from `make_eft`: a judge scores the ranked replies and a prompt's
rows are kept only where its order agrees with the humans', then the dominant
score is downsampled (Yuan et al. 2024, section 3).

Both OpenAssistant exports are read: trees (one JSON tree per line) and flat
messages (one message per row, JSONL or Parquet, as in the hub's oasst1), and
both are normalized to the same first-turn records:

    {"tree_id", "prompt_id", "instruction", "lang",
     "prompt_deleted", "prompt_review_result",
     "replies": [{"message_id", "text", "rank", "lang", "deleted", "review_result"}]}
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from selfreward.data import EFT_FIELDS, IFT_FIELDS, iter_jsonl
from selfreward.errors import SelfRewardError
from selfreward.backends.judges.base import Group

FLAT_REQUIRED = ("message_id", "parent_id", "role", "text")
FILTER_KEYS = ("prompt_deleted", "prompt_review", "prompt_lang", "prompt_empty",
               "reply_deleted", "reply_review", "reply_lang", "reply_empty")
JUSTIFICATION_WORDS = 100


# --- reading ---

def read_oasst(path: str | Path) -> list[dict]:
    """First-turn records from an OpenAssistant trees or flat-messages file (.jsonl, .jsonl.gz, .parquet)."""
    path = Path(path)
    if not path.is_file():
        raise SelfRewardError(f"OpenAssistant file not found: {path}")
    if path.suffix == ".parquet":
        return _from_flat(_parquet_rows(path), path)
    lines = _jsonl_objects(path)
    first = next(lines, None)
    if first is None:
        raise SelfRewardError(f"{path}: no rows")
    where, row = first
    rest = _chain(first, lines)
    if "prompt" in row and "message_tree_id" in row:
        return [_from_tree(r, w) for w, r in rest]
    if "message_id" in row and "parent_id" in row:
        return _from_flat(rest, path)
    keys = ", ".join(sorted(row)) or "none"
    raise SelfRewardError(f"{where}: unknown OpenAssistant format: expected trees ('message_tree_id', 'prompt') "
                          f"or flat messages ('message_id', 'parent_id'); found keys: {keys}")


def _chain(first, rest):
    yield first
    yield from rest


def _jsonl_objects(path: Path) -> Iterator[tuple[str, dict]]:
    return iter_jsonl(path, "OpenAssistant file")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise SelfRewardError(f"{path}: cannot read as Parquet ({e})") from None
    missing = [c for c in FLAT_REQUIRED if c not in table.column_names]
    if missing:
        raise SelfRewardError(f"{path}: not OpenAssistant flat messages: missing column(s) {', '.join(missing)}; "
                              f"found: {', '.join(table.column_names)}")
    # Row numbers count from 1, like lines, so an error points at the same message either way.
    for n, row in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {n}", row


def _from_tree(row: dict, where: str) -> dict:
    prompt = row.get("prompt")
    if not isinstance(prompt, dict):
        raise SelfRewardError(f"{where}: 'prompt' must be a JSON object")
    text = _text(prompt, where, "prompt")
    replies = prompt.get("replies") or []
    if not isinstance(replies, list):
        raise SelfRewardError(f"{where}: the prompt's 'replies' must be a list")
    lang = prompt.get("lang")
    out = []
    for i, reply in enumerate(replies):
        if not isinstance(reply, dict):
            raise SelfRewardError(f"{where}: reply {i} of the prompt must be a JSON object")
        if reply.get("role", "assistant") != "assistant":
            continue
        out.append(_reply(reply, where, f"reply {i}", lang))
    return _record(row.get("message_tree_id"), prompt, text, out, where)


def _from_flat(rows: Iterable[tuple[str, dict]], path: Path) -> list[dict]:
    prompts: dict[str, tuple[str, dict]] = {}
    children: dict[str, list[tuple[str, dict]]] = {}
    for where, row in rows:
        for name in FLAT_REQUIRED:
            if name not in row:
                raise SelfRewardError(f"{where}: missing field '{name}'")
        if row["message_id"] is None:
            raise SelfRewardError(f"{where}: field 'message_id' is null")
        if row["parent_id"] is None:
            if row["role"] == "prompter":
                prompts[row["message_id"]] = (where, row)
        elif row["role"] == "assistant":
            children.setdefault(row["parent_id"], []).append((where, row))
    if not prompts:
        raise SelfRewardError(f"{path}: no first-turn prompts (rows with role 'prompter' and a null parent_id)")
    records = []
    for message_id, (where, row) in prompts.items():
        lang = row.get("lang")
        replies = [_reply(r, w, "message", lang) for w, r in children.get(message_id, [])]
        # In oasst the tree id is the root message's id, so a file without the column still groups right.
        tree_id = row.get("message_tree_id") or message_id
        records.append(_record(tree_id, row, _text(row, where, "prompt"), replies, where))
    return records


def _record(tree_id, prompt: dict, text: str, replies: list[dict], where: str) -> dict:
    # Ranked replies first, best first: both exports then give the same order whatever their row order.
    replies.sort(key=lambda r: (r["rank"] is None, r["rank"] if r["rank"] is not None else 0))
    return {"tree_id": tree_id, "prompt_id": prompt.get("message_id"), "instruction": text,
            "lang": prompt.get("lang"), "prompt_deleted": _flag(prompt, "deleted", where) or False,
            "prompt_review_result": _flag(prompt, "review_result", where), "replies": replies}


def _reply(msg: dict, where: str, what: str, prompt_lang) -> dict:
    return {"message_id": msg.get("message_id"), "text": _text(msg, where, what),
            "rank": _rank(msg.get("rank"), where, what),
            # A reply without its own lang is taken to be in its prompt's language.
            "lang": msg.get("lang") or prompt_lang,
            "deleted": _flag(msg, "deleted", where) or False,
            "review_result": _flag(msg, "review_result", where)}


def _text(msg: dict, where: str, what: str) -> str:
    text = msg.get("text")
    if not isinstance(text, str):
        raise SelfRewardError(f"{where}: {what} needs a string 'text'")
    return text


def _rank(value, where: str, what: str) -> int | None:
    if value is None:
        return None
    # Parquet written through pandas turns a nullable int column into floats (NaN for null).
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SelfRewardError(f"{where}: {what} has rank {value!r}; expected a non-negative integer or null")
    return value


def _flag(msg: dict, name: str, where: str) -> bool | None:
    value = msg.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise SelfRewardError(f"{where}: field '{name}' must be true, false or null, got {value!r}")


# --- filtering and conversion ---

def filter_records(records: list[dict], lang: Iterable[str] | str | None = ("en",), drop_deleted: bool = True,
                   require_review: bool = True) -> tuple[list[dict], dict[str, int]]:
    """Records kept, and how many prompts and replies each filter dropped (each counted once, first reason)."""
    langs = None if lang is None else {lang} if isinstance(lang, str) else set(lang)
    counts = dict.fromkeys(FILTER_KEYS, 0)

    def reason(msg_lang, deleted, review, text, kind):
        if drop_deleted and deleted:
            return f"{kind}_deleted"
        if require_review and review is False:
            return f"{kind}_review"
        if langs is not None and msg_lang not in langs:
            return f"{kind}_lang"
        # Blank text would only be rejected later by the IFT/EFT readers.
        if not text.strip():
            return f"{kind}_empty"
        return None

    kept = []
    for rec in records:
        why = reason(rec["lang"], rec["prompt_deleted"], rec["prompt_review_result"], rec["instruction"], "prompt")
        if why:
            counts[why] += 1
            continue
        replies = []
        for r in rec["replies"]:
            why = reason(r["lang"], r["deleted"], r["review_result"], r["text"], "reply")
            if why:
                counts[why] += 1
            else:
                replies.append(r)
        kept.append({**rec, "replies": replies})
    return kept, counts


def to_ift(records: list[dict]) -> list[dict]:
    """Each prompt with its rank-0 reply; prompts without one are skipped."""
    rows = []
    for rec in records:
        best = next((r for r in rec["replies"] if r["rank"] == 0 and r["text"].strip()), None)
        if best is not None and rec["instruction"].strip():
            rows.append({"instruction": rec["instruction"], "response": best["text"]})
    return rows


def to_eft_eval(records: list[dict]) -> list[dict]:
    """Prompts with >= 2 ranked replies, as the ranked eval format (rank 0 = best, ranks as given)."""
    rows = []
    for rec in records:
        ranked = [{"text": r["text"], "rank": r["rank"]} for r in rec["replies"] if r["rank"] is not None]
        if len(ranked) >= 2 and rec["instruction"].strip():
            rows.append({"instruction": rec["instruction"], "responses": ranked, "tree_id": rec["tree_id"]})
    return rows


# --- writing ---

def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL atomically: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_ift(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_jsonl(path, ({k: r[k] for k in IFT_FIELDS} for r in rows))


def write_eft(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_jsonl(path, ({k: r[k] for k in EFT_FIELDS} for r in rows))


def import_oasst(path: str | Path, out_dir: str | Path, lang: Iterable[str] | str | None = ("en",),
                 drop_deleted: bool = True, require_review: bool = True) -> dict:
    """Write out_dir/ift.jsonl and out_dir/eft_eval.jsonl from an OpenAssistant file; returns the counts."""
    records = read_oasst(path)
    kept, dropped = filter_records(records, lang=lang, drop_deleted=drop_deleted, require_review=require_review)
    if not kept:
        langs = "all" if lang is None else lang if isinstance(lang, str) else ",".join(lang)
        raise SelfRewardError(f"{path}: none of {len(records)} prompts passed the filters (lang={langs}); "
                              f"dropped: {_nonzero(dropped)}")
    ift, eft = to_ift(kept), to_eft_eval(kept)
    out_dir = Path(out_dir)
    write_ift(out_dir / "ift.jsonl", ift)
    write_jsonl(out_dir / "eft_eval.jsonl", eft)
    return {"prompts_read": len(records), "prompts_kept": len(kept), "dropped": dropped,
            "ift_rows": len(ift), "eft_rows": len(eft)}


def _nonzero(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "nothing"


# --- EFT targets from a judge ---

# A `Score:` the judge wrote before its final one (a draft, a recap) is not justification text.
_SCORE_LINE = re.compile(r"(?<![a-z])score\**\s*:", re.IGNORECASE)


def justification(rationale: str, max_words: int = JUSTIFICATION_WORDS) -> str:
    """The judge's rationale without any `Score:` line, cut after max_words words (layout kept)."""
    text = "\n".join(line for line in rationale.splitlines() if not _SCORE_LINE.search(line)).strip()
    words = list(re.finditer(r"\S+", text))
    if len(words) > max_words:
        text = text[: words[max_words - 1].end()]
    return text


def make_eft(groups: list[dict], judge, samples: int = 1, seed: int = 0, max_share: float | None = 0.4,
             rng_seed: int = 0) -> tuple[list[dict], dict]:
    """EFT rows from ranked groups, kept only where the judge's order agrees with the human order."""
    usable = []
    for g in groups:
        ranked = [r for r in g["responses"] if r.get("rank") is not None]
        if len(ranked) >= 2:
            usable.append((g["instruction"], ranked))
    stats = {"prompts": len(groups), "prompts_judged": len(usable), "skipped": len(groups) - len(usable),
             "agreeing": 0, "disagreeing": 0, "unscored": 0, "rows_out_of_range": 0, "rows_no_justification": 0}
    # One call for everything: batched backends (vLLM, API pools) only go fast when given all the work.
    results = judge.judge_groups([Group(i, [r["text"] for r in ranked]) for i, ranked in usable], samples, seed)
    rows = []
    for (instruction, ranked), result in zip(usable, results):
        scores = [_mean_score(vs) for vs in result.verdicts]
        if any(s is None for s in scores):
            stats["unscored"] += 1
            continue
        ranks = [r["rank"] for r in ranked]
        if not _agrees(ranks, scores):
            stats["disagreeing"] += 1
            continue
        stats["agreeing"] += 1
        for reply, score, verdicts in zip(ranked, scores, result.verdicts):
            score = math.floor(score + 0.5)
            if not 0 <= score <= 5:
                stats["rows_out_of_range"] += 1
                continue
            first = next(v for v in verdicts if v.parsed.score is not None)
            why = justification(first.parsed.rationale)
            if not why:
                # read_eft rejects an empty justification, and a bare score teaches no reasoning.
                stats["rows_no_justification"] += 1
                continue
            rows.append({"instruction": instruction, "response": reply["text"], "justification": why,
                         "score": score})
    stats["rows_before"] = len(rows)
    stats["scores_before"] = _score_counts(rows)
    rows, used = downsample(rows, max_share, rng_seed)
    stats["max_share_used"] = used
    stats["rows_after"] = len(rows)
    stats["scores_after"] = _score_counts(rows)
    return rows, stats


def _mean_score(verdicts) -> float | None:
    parsed = [v.parsed.score for v in verdicts if v.parsed.score is not None]
    return sum(parsed) / len(parsed) if parsed else None


def _agrees(ranks: list[int], scores: list[float]) -> bool:
    """Every pair the humans ordered is ordered the same way by the judge, strictly (a tie is not agreement)."""
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            if ranks[i] < ranks[j] and not scores[i] > scores[j]:
                return False
    return True


def _score_counts(rows: list[dict]) -> dict[int, int]:
    return dict(sorted(Counter(r["score"] for r in rows).items()))


def downsample(rows: list[dict], max_share: float | None, rng_seed: int = 0) -> tuple[list[dict], float | None]:
    """Drop random rows of the dominant score(s) until none holds more than max_share of the rows.

    With k distinct scores no cap below 1/k can be met without emptying a score,
    so the cap used is max(max_share, 1/k); it is returned with the rows.
    """
    if max_share is None:
        return list(rows), None
    if not 0 < max_share <= 1:
        raise SelfRewardError(f"max_share must be in (0, 1], got {max_share}")
    counts = Counter(r["score"] for r in rows)
    if not counts:
        return [], max_share
    share = max(max_share, 1 / len(counts))
    keep = dict(counts)
    # Trim the largest over-cap score one row at a time: trimming one shrinks the total, which tightens the
    # cap on the others, so the target counts are found together, not per score.
    while True:
        total = sum(keep.values())
        over = [s for s, c in keep.items() if c > share * total + 1e-9]
        if not over:
            break
        keep[max(over, key=lambda s: (keep[s], s))] -= 1
    rng = random.Random(rng_seed)
    dropped = set()
    for score in sorted(counts):
        n_drop = counts[score] - keep[score]
        if n_drop:
            dropped.update(rng.sample([i for i, r in enumerate(rows) if r["score"] == score], n_drop))
    return [r for i, r in enumerate(rows) if i not in dropped], share
