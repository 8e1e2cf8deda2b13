"""Getting data out of a run and human labels back in.

- `export_pairs`: a round's kept pairs as TRL preference data (conversational),
  with the ids needed to trace each pair back to its judgments.
- `export_label_studio` / `import_labels`: a round's candidates as Label Studio
  ranking tasks, and the finished rankings back into `judgments` as judge
  `human:<annotator>`, next to the model's own judgments of the same candidates.
- `export_alpaca_eval`: each model's answers to held-out prompts in AlpacaEval's
  model_outputs format, one file per model, for `alpaca_eval --model_outputs`.

An export never deletes or replaces what it did not write: it refuses a target
that exists (unless forced, and then overwrites only its own files) and any
target inside a run folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from selfreward import __version__
from selfreward.errors import SelfRewardError
from selfreward.core.store import Run, now

FORMATS = ("jsonl", "parquet", "datasets")
LABELING_CONFIG = """<View>
  <Style>
    .htx-ranker-item p { white-space: pre-wrap; }
    .htx-ranker-item p:last-child { display: none; }
  </Style>
  <Text name="prompt" value="$prompt"/>
  <List name="answers" value="$items" title="Responses (top = best)"/>
  <Ranker name="rank" toName="answers"/>
</View>
"""
RANKER = "rank"
ITEM_ID = re.compile(r"c(\d+)")
HUMAN_MAX = 5.0  # the top of the additive judge's 0-5 scale, so human and model scores compare


# --- preference pairs ---

def export_pairs(run: Run, round: int, out: str | Path, fmt: str = "jsonl", force: bool = False) -> int:
    """Write round's kept pairs to `out` as jsonl, parquet or a datasets folder; return the row count.

    See `_check_target` and `_write_output` for what may already be at `out` and what `force` allows.
    """
    if fmt not in FORMATS:
        raise SelfRewardError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_target(out, folder=fmt == "datasets", force=force, what=f"a {fmt} export")
    rows = pair_rows(run, round)
    if fmt == "jsonl":
        _write_output(out, lambda tmp: tmp.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        _write_output(out, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))
    else:
        import datasets

        _write_output(out, lambda tmp: datasets.Dataset.from_list(rows).save_to_disk(str(tmp)))
    return len(rows)


def pair_rows(run: Run, round: int) -> list[dict]:
    """The kept pairs of a round in TRL's conversational preference format."""
    _check_round(run, round)
    pairs = run.rows(
        "select x.id pair_id, x.prompt_id, x.chosen_id, x.rejected_id, x.chosen_score, x.rejected_score, "
        "p.text prompt, c.text chosen, r.text rejected from pairs x join prompts p on p.id = x.prompt_id "
        "join candidates c on c.id = x.chosen_id join candidates r on r.id = x.rejected_id "
        "where x.round = ? and x.status = 'kept' order by x.id", [round])
    if not pairs:
        counts = {r["status"]: r["n"] for r in run.rows(
            "select status, count(*) n from pairs where round = ? group by status", [round])}
        why = (f"its pairs are {', '.join(f'{n} {s}' for s, n in counts.items())}" if counts
               else "it has no pairs yet (round 1 is SFT only; pairs come from round 2 on)")
        raise SelfRewardError(f"round {round} has no kept pairs to export: {why}")
    # Only the model's judgments: they are what chosen_score and rejected_score were computed from.
    judgment_ids: dict[int, list[int]] = {}
    for j in run.rows("select j.id, j.candidate_id from judgments j join pairs x "
                      "on j.candidate_id in (x.chosen_id, x.rejected_id) "
                      "where x.round = ? and x.status = 'kept' and j.judge not like 'human:%' order by j.id",
                      [round]):
        judgment_ids.setdefault(j["candidate_id"], []).append(j["id"])
    return [{
        "prompt": [{"role": "user", "content": p["prompt"]}],
        "chosen": [{"role": "assistant", "content": p["chosen"]}],
        "rejected": [{"role": "assistant", "content": p["rejected"]}],
        "chosen_score": p["chosen_score"], "rejected_score": p["rejected_score"],
        "pair_id": p["pair_id"], "prompt_id": p["prompt_id"], "chosen_id": p["chosen_id"],
        "rejected_id": p["rejected_id"],
        "chosen_judgment_ids": judgment_ids.get(p["chosen_id"], []),
        "rejected_judgment_ids": judgment_ids.get(p["rejected_id"], []),
        "round": round,
    } for p in pairs]


# --- Label Studio ---

def export_label_studio(run: Run, round: int, out_dir: str | Path, force: bool = False) -> int:
    """Write tasks.json (one ranking task per prompt of the round) and labeling_config.xml; return the task count."""
    out_dir = Path(out_dir)
    _check_target(out_dir, folder=True, force=force, what="a Label Studio export")
    _check_round(run, round)
    cands = run.rows("select c.id, c.prompt_id, c.text, p.text prompt from candidates c "
                     "join prompts p on p.id = c.prompt_id where c.round = ? order by c.prompt_id, c.idx", [round])
    if not cands:
        raise SelfRewardError(f"round {round} has no candidates to label (round 1 is SFT only; "
                              "candidates come from round 2 on)")
    tasks: dict[int, dict] = {}
    for c in cands:
        task = tasks.setdefault(c["prompt_id"], {"data": {"prompt": c["prompt"], "prompt_id": c["prompt_id"],
                                                          "items": []}})
        items = task["data"]["items"]
        items.append({"id": f"c{c['id']}", "title": f"Response {len(items) + 1}", "body": c["text"]})

    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "tasks.json").write_text(json.dumps(list(tasks.values()), ensure_ascii=False, indent=2),
                                        encoding="utf-8")
        (tmp / "labeling_config.xml").write_text(LABELING_CONFIG, encoding="utf-8")

    _write_output(out_dir, write)
    return len(tasks)


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


# --- AlpacaEval ---

def export_alpaca_eval(run: Run, out_dir: str | Path, force: bool = False) -> dict[str, int]:
    """Write <model>.json per model into out_dir: a JSON list of {instruction, output, generator,
    dataset}, AlpacaEval's model_outputs format; return each model's answer count.

    The generator is "<run>-<model>" (AlpacaEval's leaderboard name, so two runs' M1 stay apart),
    the dataset the name of the prompts file. Each file lists the instructions in one order, so
    that files of different models line up prompt by prompt.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, folder=True, force=force, what="an AlpacaEval export")
    answers = held_out_answers(run)
    if not answers:
        raise SelfRewardError(f"run {run.path} has no answers to held-out prompts yet: each round's eval stage "
                              "writes them (if_eval, eval_judge), and so does `selfreward eval head2head RUN --a M1 "
                              "--b M3`")

    def write(tmp: Path) -> None:
        tmp.mkdir()
        for model, rows in answers.items():
            records = [{"instruction": r["instruction"], "output": r["output"],
                        "generator": f"{run.path.name}-{model}", "dataset": r["dataset"]} for r in rows]
            (tmp / f"{model}.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")

    _write_output(out_dir, write)
    return {model: len(rows) for model, rows in answers.items()}


def held_out_answers(run: Run) -> dict[str, list[dict]]:
    """Per model, its answer to each held-out prompt it answered ({instruction, output, dataset}):
    the loop's greedy answers (table eval_answers: the win-rate and verifiable-instruction sets,
    and `eval instruct`), then `eval head2head`'s (table head2head); where a model answered a
    prompt several times, its latest answer. Prompts are in the order they were first answered."""
    latest: dict[str, dict[str, dict]] = {}
    order: dict[str, int] = {}
    for a in run.rows("select model, dataset, prompt, text from eval_answers where error is null order by id"):
        order.setdefault(a["prompt"], len(order))
        dataset = {"win": "win_eval", "if": "if_eval"}.get(a["dataset"], a["dataset"].split(":")[0] + "_eval")
        latest.setdefault(a["model"], {})[a["prompt"]] = {"instruction": a["prompt"], "output": a["text"],
                                                           "dataset": dataset}
    for h in run.rows("select h.id, h.prompt, h.a_model, h.b_model, h.a_text, h.b_text, "
                      "(select m.dataset from eval_metrics m where m.eval_id = h.eval_id limit 1) dataset "
                      "from head2head h order by h.id"):
        order.setdefault(h["prompt"], len(order))
        dataset = Path(h["dataset"]).stem if h["dataset"] else None
        for side in ("a", "b"):
            latest.setdefault(h[f"{side}_model"], {})[h["prompt"]] = {
                "instruction": h["prompt"], "output": h[f"{side}_text"], "dataset": dataset}
    rank = {m["name"]: k for k, m in enumerate(run.rows("select name from models order by round, name"))}
    return {model: sorted(latest[model].values(), key=lambda r: order[r["instruction"]])
            for model in sorted(latest, key=lambda m: (rank.get(m, len(rank)), m))}


# --- shared ---

def _check_round(run: Run, round: int) -> None:
    if not run.db.execute("select 1 from rounds where round = ?", [round]).fetchone():
        have = [r[0] for r in run.db.execute("select round from rounds order by round").fetchall()]
        raise SelfRewardError(f"round {round} is not in run {run.path} "
                              f"({'rounds: ' + ', '.join(map(str, have)) if have else 'it has no rounds yet'})")


def refuse_run_folder(out: str | Path, verb: str = "export") -> None:
    """Refuse an output path inside any run folder (`--out runs/demo/run.db` would replace the run's
    database): a run folder holds only what the run wrote, and resuming trusts that."""
    where = Path(out).resolve()
    run_dir = next((p for p in (where, *where.parents) if (p / "run.db").is_file()), None)
    if run_dir is not None:
        raise SelfRewardError(f"{out} is inside the run folder {run_dir}; {verb} to a path outside any run folder")


def _check_target(out: Path, folder: bool, force: bool, what: str) -> None:
    """Refuse, before anything is written, a target that would cost the user files export did not write."""
    refuse_run_folder(out)  # even with --force
    if out.is_dir():
        if not folder:
            raise SelfRewardError(f"{out} is a folder, and {what} is one file; give a file path")
        if any(out.iterdir()) and not force:
            raise SelfRewardError(f"{out} is a folder that is not empty; give a new path, or --force to overwrite "
                                  "the files this export writes there (other files are left alone)")
    elif out.exists() or out.is_symlink():
        if folder:
            raise SelfRewardError(f"{out} is a file, and {what} is a folder; give a new path")
        if not force:
            raise SelfRewardError(f"{out} already exists; give a new path, or --force to overwrite it")


def _write_output(out: Path, write) -> None:
    """Call write(tmp) on a temporary path beside `out`, then rename the result into place.

    A failure leaves `out` as it was. A new file or folder (or one over an empty
    folder) arrives in one rename. Over a non-empty folder (--force), each file
    written is renamed over its namesake and every other file stays; nothing that
    export did not write is deleted or replaced.
    """
    out = Path(os.path.abspath(out))  # so '.' has a name and a parent to stage beside
    out.parent.mkdir(parents=True, exist_ok=True)
    # A fresh folder of our own beside `out` (same file system, so the renames are atomic).
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp = stage / out.name
        write(tmp)
        if tmp.is_dir() and out.is_dir() and any(out.iterdir()):
            items = sorted(tmp.iterdir())
            clash = [item.name for item in items if (out / item.name).is_dir()]
            if clash:
                raise SelfRewardError(f"{out} holds a folder named {clash[0]} where this export writes a file; "
                                      "give a new path")
            for item in items:
                os.replace(item, out / item.name)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
