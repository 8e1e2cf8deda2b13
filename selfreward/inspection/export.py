"""Getting data out of a run.

- `export_pairs`: a round's kept pairs as TRL preference data (conversational),
  with the ids needed to trace each pair back to its judgments.
- `export_label_studio`: a round's candidates as Label Studio ranking tasks
  (`selfreward.data.labels.import_labels` brings the finished rankings back).
- `export_alpaca_eval`: each model's answers to held-out prompts in AlpacaEval's
  model_outputs format, one file per model, for `alpaca_eval --model_outputs`.

An export never deletes or replaces what it did not write: it refuses a target
that exists (unless forced, and then overwrites only its own files) and any
target inside a run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from selfreward.errors import SelfRewardError
from selfreward.core.store import Run

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
        "select pair_id, prompt_id, chosen_id, rejected_id, chosen_score, rejected_score, prompt, chosen, rejected "
        "from pair_texts where round = ? and status = 'kept' order by pair_id", [round])
    if not pairs:
        counts = {r["status"]: r["n"] for r in run.rows(
            "select status, count(*) n from pairs where round = ? group by status", [round])}
        why = (f"its pairs are {', '.join(f'{n} {s}' for s, n in counts.items())}" if counts
               else "it has no pairs yet (round 1 is SFT only; pairs come from round 2 on)")
        raise SelfRewardError(f"round {round} has no kept pairs to export: {why}")
    # Only the model's judgments: they are what chosen_score and rejected_score were computed from.
    judgment_ids: dict[int, list[int]] = {}
    for j in run.rows("select j.id, j.candidate_id from model_judgments j join pairs x "
                      "on j.candidate_id in (x.chosen_id, x.rejected_id) "
                      "where x.round = ? and x.status = 'kept' order by j.id",
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
