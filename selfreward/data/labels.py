"""`import-labels`: the rankings of a Label Studio JSON export (of the tasks that `export
label-studio` wrote) back into `judgments` as judge `human:<annotator>`, next to the model's own
judgments of the same candidates. Not inspection: it writes to run.db."""

from __future__ import annotations

import json
import re
from pathlib import Path

from selfreward import __version__
from selfreward.core.store import Run, now
from selfreward.errors import SelfRewardError

RANKER = "rank"  # the Ranker's name in export.LABELING_CONFIG
ITEM_ID = re.compile(r"c(\d+)")
HUMAN_MAX = 5.0  # the top of the additive judge's 0-5 scale, so human and model scores compare


def import_labels(run: Run, export_path: str | Path, round: int | None = None) -> dict:
    """Turn the rankings of a Label Studio JSON export into `human:<annotator>` judgments.

    Rank position becomes a 0-5 score, best = 5 and worst = 0, linear in between.
    Everything is checked before anything is written, and all rows go in one
    transaction. An annotation imported before is skipped, so re-importing a
    later export of the same project only adds the new annotations.
    """
    export_path = Path(export_path)
    try:
        tasks = json.loads(export_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SelfRewardError(f"no Label Studio export at {export_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SelfRewardError(f"{export_path} is not valid JSON ({e}); export the project as 'JSON'") from None
    if not isinstance(tasks, list):
        raise SelfRewardError(f"{export_path} is not a Label Studio JSON export (expected a list of tasks)")
    stamp = now()
    columns = {name: None for name in run.db["judgments"].columns_dict if name != "id"}
    next_sample: dict[int, int] = {}
    rows: list[dict] = []
    counts = {"tasks": len(tasks), "annotations": 0, "judgments": 0, "skipped_cancelled": 0, "skipped_existing": 0,
              "skipped_no_id": 0, "skipped_duplicate": 0}
    seen = set()  # (annotator, annotation id) already taken from this file
    for n, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise SelfRewardError(f"{export_path}: task #{n + 1} is not a JSON object")
        task_id = task.get("id", f"#{n + 1}")
        if "annotations" not in task:
            raise SelfRewardError(f"task {task_id} has no 'annotations': export the project as 'JSON' "
                                  "(JSON-MIN and CSV exports do not carry rankings)")
        offered = {item.get("id") for item in (task.get("data") or {}).get("items") or []
                   if isinstance(item, dict)}
        for ann in task["annotations"]:
            if not isinstance(ann, dict):
                raise SelfRewardError(f"task {task_id}: an annotation is not a JSON object")
            if ann.get("was_cancelled"):
                counts["skipped_cancelled"] += 1
                continue
            if ann.get("id") is None:
                # The id is what tells one annotation from another (and an import from a re-import).
                counts["skipped_no_id"] += 1
                continue
            where = f"task {task_id}, annotation {ann.get('id')}"
            result, ranking = _ranking(ann, where)
            cands = _ranked_candidates(run, ranking, offered, round, where)
            judge = f"human:{_annotator(ann)}"
            if (judge, str(ann["id"])) in seen:
                counts["skipped_duplicate"] += 1
                continue
            seen.add((judge, str(ann["id"])))
            prefix = f"Label Studio annotation {ann.get('id')}: "
            if run.db.execute(
                    "select 1 from judgments where judge = ? and rationale like ? escape '\\' "
                    f"and candidate_id in ({', '.join('?' * len(cands))}) limit 1",
                    [judge, _like_prefix(prefix), *(c["id"] for c in cands)]).fetchone():
                counts["skipped_existing"] += 1
                continue
            size = len(cands)
            for pos, c in enumerate(cands):
                if c["id"] not in next_sample:
                    last = run.db.execute("select max(sample) from judgments where candidate_id = ?",
                                          [c["id"]]).fetchone()[0]
                    next_sample[c["id"]] = 0 if last is None else last + 1
                rows.append({**columns, "round": c["round"], "candidate_id": c["id"],
                             "sample": next_sample[c["id"]], "judge": judge,
                             "score": HUMAN_MAX * (size - 1 - pos) / (size - 1), "reason": None,
                             "rationale": f"{prefix}ranked {pos + 1} of {size}",
                             "raw": json.dumps(result, ensure_ascii=False), "created_at": stamp,
                             "version": __version__})
                next_sample[c["id"]] += 1
            counts["annotations"] += 1
    with run.db.atomic():
        if rows:
            run.db["judgments"].insert_all(rows)
    counts["judgments"] = len(rows)
    return counts


def _ranking(ann: dict, where: str) -> tuple[dict, list]:
    """The ranker result item of an annotation and its ranked item ids, best first."""
    results = [r for r in ann.get("result") or [] if isinstance(r, dict) and r.get("type") == "ranker"]
    # Prefer our own Ranker by name, in case a project config added another.
    result = next((r for r in results if r.get("from_name") == RANKER), results[0] if results else None)
    if result is None:
        raise SelfRewardError(f"{where}: no ranker result (expected from_name '{RANKER}' of type 'ranker'); "
                              "was the project set up with labeling_config.xml?")
    value = result.get("value")
    ranker = value.get("ranker") if isinstance(value, dict) else None
    # Label Studio stores {ranker name: [ids]} for a List + Ranker; older versions a plain list.
    if isinstance(ranker, dict):
        name = result.get("from_name")
        ranker = ranker.get(name) if name in ranker else next(iter(ranker.values())) if len(ranker) == 1 else None
    if not isinstance(ranker, list) or not ranker:
        raise SelfRewardError(f"{where}: the ranker result holds no ranking (value: "
                              f"{json.dumps(value)[:200]})")
    return result, ranker


def _ranked_candidates(run: Run, ranking: list, offered: set, round: int | None, where: str) -> list[dict]:
    ids = []
    for item in ranking:
        m = ITEM_ID.fullmatch(item) if isinstance(item, str) else None
        if m is None:
            raise SelfRewardError(f"{where}: ranked item {item!r} is not a candidate id like 'c12'")
        if offered and item not in offered:
            raise SelfRewardError(f"{where}: ranked item {item} is not one of the task's responses")
        ids.append(int(m.group(1)))
    if len(set(ids)) != len(ids):
        raise SelfRewardError(f"{where}: the ranking lists a response twice")
    if len(ids) < 2:
        raise SelfRewardError(f"{where}: the ranking has {len(ids)} response; a ranking needs at least 2")
    found = {c["id"]: c for c in run.rows(
        f"select id, round, prompt_id from candidates where id in ({', '.join('?' * len(ids))})", ids)}
    missing = [f"c{i}" for i in ids if i not in found]
    if missing:
        raise SelfRewardError(f"{where}: unknown candidate id {', '.join(missing)} (not in run {run.path}); "
                              "was the export made from another run?")
    cands = [found[i] for i in ids]
    if len({c["prompt_id"] for c in cands}) > 1:
        raise SelfRewardError(f"{where}: the ranking mixes responses to different prompts")
    if round is not None and cands[0]["round"] != round:
        raise SelfRewardError(f"{where}: its responses are from round {cands[0]['round']}, not round {round}")
    return cands


def _annotator(ann: dict):
    who = ann.get("completed_by")
    # Some Label Studio exports expand the annotator into a user object.
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return who


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
