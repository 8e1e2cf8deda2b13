"""The run store: one folder per run, one SQLite file (run.db) in it.

Every stage writes its rows and its `stages` marker in one transaction, so a
stage is either wholly there or wholly absent. `Run.stage_done` is what makes a
killed run resume where it stopped.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import os
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils
from sqlite_utils import Migrations

from selfreward import __version__
from selfreward.config import Config, as_dict, to_toml
from selfreward.errors import SelfRewardError

migrations = Migrations("selfreward")


@migrations()
def m001_initial(db: sqlite_utils.Database):
    db["config"].create({"key": str, "value": str}, pk="key")
    db["rounds"].create(
        {"round": int, "model_in": str, "model_out": str, "started_at": str, "finished_at": str, "wall_s": float},
        pk="round",
    )
    db["stages"].create(
        {"round": int, "stage": str, "started_at": str, "finished_at": str, "wall_s": float,
         "peak_rss_mb": float, "detail": str},
        pk=("round", "stage"),
    )
    db["models"].create(
        {"name": str, "round": int, "kind": str, "parent": str, "path": str, "adapter_path": str,
         "note": str, "created_at": str},
        pk="name",
    )
    db["prompts"].create(
        {"id": int, "round": int, "text": str, "source": str, "created_at": str},
        pk="id",
    )
    db["candidates"].create(
        {"id": int, "round": int, "prompt_id": int, "idx": int, "text": str, "n_tokens": int,
         "finish_reason": str, "model": str},
        pk="id", foreign_keys=[("prompt_id", "prompts", "id")],
    )
    db["judgments"].create(
        {"id": int, "round": int, "candidate_id": int, "sample": int, "judge": str, "score": float,
         "reason": str, "rationale": str, "raw": str, "n_tokens": int, "template_sha": str, "created_at": str},
        pk="id", foreign_keys=[("candidate_id", "candidates", "id")],
    )
    db["pairs"].create(
        {"id": int, "round": int, "prompt_id": int, "status": str, "chosen_id": int, "rejected_id": int,
         "chosen_score": float, "rejected_score": float, "n_scored": int, "n_unscored": int, "rule": str},
        pk="id", foreign_keys=[("prompt_id", "prompts", "id")],
    )
    db["training_steps"].create(
        {"round": int, "kind": str, "step": int, "epoch": float, "loss": float, "learning_rate": float,
         "grad_norm": float, "rewards_margin": float, "rewards_accuracy": float, "rewards_chosen": float,
         "rewards_rejected": float},
    )
    db["eft_eval"].create(
        {"round": int, "model": str, "example": int, "gold_score": int, "score": float, "reason": str,
         "raw": str},
    )
    db["metrics"].create({"round": int, "model": str, "name": str, "value": float}, pk=("round", "model", "name"))
    for table, cols in {"candidates": ["round"], "judgments": ["round"], "pairs": ["round"],
                        "prompts": ["round"]}.items():
        db[table].create_index(cols)
    db["judgments"].create_index(["candidate_id"])
    db["candidates"].create_index(["prompt_id"])


@migrations()
def m002_judge_backends(db: sqlite_utils.Database):
    # API judges report token usage; pairwise judges and PairRM compare responses in both orders.
    db["judgments"].add_column("prompt_tokens", int)
    db["judgments"].add_column("completion_tokens", int)
    db["comparisons"].create(
        {"id": int, "round": int, "prompt_id": int, "sample": int, "a_id": int, "b_id": int, "outcome": str,
         "judge": str, "ab_score": float, "ba_score": float, "ab_raw": str, "ba_raw": str, "ab_reason": str,
         "ba_reason": str, "template_sha": str, "created_at": str},
        pk="id", foreign_keys=[("prompt_id", "prompts", "id")],
    )
    db["comparisons"].create_index(["round"])


@migrations()
def m003_evals(db: sqlite_utils.Database):
    db["eval_metrics"].create(
        {"eval_id": str, "kind": str, "judge": str, "model": str, "dataset": str, "name": str, "value": float,
         "created_at": str},
    )
    db["eval_metrics"].create_index(["eval_id"])
    db["head2head"].create(
        {"id": int, "eval_id": str, "prompt": str, "a_model": str, "b_model": str, "a_text": str, "b_text": str,
         "a_tokens": int, "b_tokens": int, "outcome": str, "judge": str},
        pk="id",
    )


# The config row holding the sha256 of each input file (IFT, EFT, eval set), taken at creation: the
# files are read again every round, and an edit between rounds would silently change the run's data.
INPUTS_KEY = "_inputs"
INPUT_KEYS = ("ift", "eft", "eft_eval", "if_eval", "win_eval")


def input_hashes(config: Config) -> dict:
    from selfreward.data import file_sha256

    out = {}
    for key in INPUT_KEYS:
        path = getattr(config, key)
        if key == "win_eval" and config.eval_judge == "none":
            continue  # read only by an eval judge
        if path:
            try:
                out[key] = {"path": path, "sha256": file_sha256(path)}
            except OSError as e:
                raise SelfRewardError(f"cannot read the {key} file {path}: {e.strerror}") from None
    return out


APPEND_ONLY = ("candidates", "judgments", "pairs", "comparisons")  # m009 adds its own three
APPEND_ONLY_M009 = ("meta_judgments", "judge_pairs", "consistency_judgments")
APPEND_ONLY_M011 = ("eval_answers", "if_checks", "eval_comparisons", "promotions")  # the actor's evaluation


def append_only_triggers(table: str) -> dict[str, str]:
    """The SQL of each trigger that keeps `table` append-only, by trigger name (`verify` compares
    the stored triggers with these)."""
    out = {f"{table}_no_{action.lower()}": f"""
                CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table}
                BEGIN SELECT RAISE(ABORT, '{table} are append-only: {action} refused'); END"""
           for action in ("UPDATE", "DELETE")}
    # INSERT OR REPLACE deletes the old row without firing the DELETE trigger (unless recursive_triggers
    # is on), so an insert may not name an id that is already there.
    out[f"{table}_no_replace"] = f"""
                CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table}
                WHEN EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id)
                BEGIN SELECT RAISE(ABORT, '{table} are append-only: INSERT of an existing id refused'); END"""
    return out


def append_only(db: sqlite_utils.Database, tables, kinds=("no_update", "no_delete")) -> None:
    """Triggers that refuse UPDATE and DELETE on each table (and, from m010, a replacing INSERT)."""
    for table in tables:
        for name, sql in append_only_triggers(table).items():
            if name.endswith(kinds):
                db.execute(sql)


@migrations()
def m004_provenance_and_audit(db: sqlite_utils.Database):
    # Provenance: which weights, prompt and sampling produced each judgment.
    for column, kind in (("judge_model_sha", str), ("sampling", str), ("version", str)):
        db["judgments"].add_column(column, kind)
    db["models"].add_column("sha256", str)
    # Once a stage commits, its records are evidence: refuse edits at the database level.
    append_only(db, APPEND_ONLY)
    # Full-text search over rationales and responses (kept in sync by triggers).
    db["judgments"].enable_fts(["rationale", "raw"], create_triggers=True)
    db["candidates"].enable_fts(["text"], create_triggers=True)


@migrations()
def m005_generation_checkpoint(db: sqlite_utils.Database):
    # Scratch space for a running stage (see checkpoint.py); emptied when a stage commits.
    db["generation_checkpoint"].create(
        {"key": str, "text": str, "n_tokens": int, "finish_reason": str, "usage": str}, pk="key")


@migrations()
def m006_item_failures(db: sqlite_utils.Database):
    # One item's failure (an over-long prompt, an HTTP 400) is stored with its reason; the stage goes on.
    db["candidates"].add_column("error", str)
    db["candidates"].add_column("retries", int)
    db["judgments"].add_column("retries", int)
    # "length": the judge hit its token limit; its score line counts only if it was complete.
    db["judgments"].add_column("finish_reason", str)
    db["generation_checkpoint"].add_column("error", str)
    db["generation_checkpoint"].add_column("retries", int)


@migrations()
def m007_training_methods(db: sqlite_utils.Database):
    # Each training method logs its own metrics (SimPO's nll, LD-DPO's weights, ...): all of them, as JSON.
    db["training_steps"].add_column("metrics", str)
    # Online RL (GRPO, RLOO): the mean judge reward of the step's samples and the KL to M_{t-1}.
    db["training_steps"].add_column("reward", float)
    db["training_steps"].add_column("kl", float)
    # How a model was trained (method, loss, 4-bit or not, steps) and, for a merged adapter, the mean
    # absolute change in held-out log-probabilities that merging into full precision made (nats).
    db["models"].add_column("detail", str)
    db["models"].add_column("merge_gap", float)


@migrations()
def m008_reward_models(db: sqlite_utils.Database):
    # `train-rm` may train several reward models from one M_t: their steps say which model they trained.
    # (Rows of the loop's training leave it NULL: theirs is M_<round>.)
    db["training_steps"].add_column("model", str)


@migrations()
def m009_judge_training(db: sqlite_utils.Database):
    # Logprob-weighted scores (G-Eval): the probabilities of the score tokens 0..5 where the judge wrote
    # its score, and their expected value, beside the parsed score.
    db["judgments"].add_column("expected_score", float)
    db["judgments"].add_column("score_probs", str)
    db["eft_eval"].add_column("expected_score", float)
    # Which score built a round's pairs, CREAM's consistency per pair, and each pair's kind:
    # 'actor' (instruction -> responses) or 'judge' (Meta-Rewarding: judge prompt -> judgments).
    db["pairs"].add_column("score_kind", str)
    db["pairs"].add_column("consistency", float)
    # Meta-Rewarding: a meta-judge compares two judgments of one candidate, in both orders.
    db["meta_judgments"].create(
        {"id": int, "round": int, "candidate_id": int, "a_id": int, "b_id": int, "order": str, "winner": str,
         "verdict_from": str, "verdict_probs": str, "rationale": str, "raw": str, "reason": str, "n_tokens": int,
         "finish_reason": str, "judge": str, "template_sha": str, "created_at": str},
        pk="id", foreign_keys=[("candidate_id", "candidates", "id"), ("a_id", "judgments", "id"),
                               ("b_id", "judgments", "id")])
    db["meta_judgments"].create_index(["round"])
    # The judge-preference pairs: per candidate, its best- and worst-rated judgment by Elo.
    db["judge_pairs"].create(
        {"id": int, "round": int, "candidate_id": int, "status": str, "chosen_id": int, "rejected_id": int,
         "chosen_elo": float, "rejected_elo": float, "n_judgments": int, "score_spread": float, "reason": str},
        pk="id", foreign_keys=[("candidate_id", "candidates", "id")])
    db["judge_pairs"].create_index(["round"])
    # CREAM: the round's candidates judged again by the previous round's judge (M_{t-2}); pairs.consistency
    # is computed from these and the round's own judgments.
    db["consistency_judgments"].create(
        {"id": int, "round": int, "candidate_id": int, "sample": int, "judge": str, "score": float,
         "expected_score": float, "reason": str, "rationale": str, "raw": str, "n_tokens": int,
         "finish_reason": str, "template_sha": str, "judge_model_sha": str, "sampling": str, "created_at": str},
        pk="id", foreign_keys=[("candidate_id", "candidates", "id")])
    db["consistency_judgments"].create_index(["round"])
    append_only(db, APPEND_ONLY_M009)
    db["meta_judgments"].enable_fts(["rationale", "raw"], create_triggers=True)


@migrations()
def m010_api_endpoint(db: sqlite_utils.Database):
    # An API judgment's server (its URL without credentials or query) and the model it says answered:
    # the name asked for is only a request, and replicas behind one name may serve different weights.
    for table in ("judgments", "generation_checkpoint"):
        db[table].add_column("endpoint", str)
        db[table].add_column("served_model", str)



@migrations()
def m010_refuse_replace(db: sqlite_utils.Database):
    # A plain sqlite3 client's INSERT OR REPLACE rewrote an append-only row past the UPDATE and DELETE triggers.
    append_only(db, APPEND_ONLY + APPEND_ONLY_M009, kinds=("no_replace",))


@migrations()
def m011_actor_eval(db: sqlite_utils.Database):
    # The actor on yardsticks the loop never trains on. Each model's greedy answers to held-out
    # prompts ('if': verifiable instructions; 'win': the win-rate instructions), written once per model.
    db["eval_answers"].create(
        {"id": int, "round": int, "model": str, "dataset": str, "key": str, "prompt": str, "text": str,
         "n_tokens": int, "finish_reason": str, "error": str, "created_at": str},
        pk="id")
    db["eval_answers"].create_index(["model", "dataset"])
    # Every constraint of a verifiable answer: passed (1), failed (0), or unchecked (both NULL, with the reason).
    db["if_checks"].create(
        {"id": int, "answer_id": int, "idx": int, "instruction_id": str, "kwargs": str, "strict": int,
         "loose": int, "unchecked": str, "checker": str},
        pk="id", foreign_keys=[("answer_id", "eval_answers", "id")])
    db["if_checks"].create_index(["answer_id"])
    # M_t against a baseline (M_{t-1}, M1) by the independent eval judge: preference 1 (M_t wins), 0.5, 0,
    # or NULL (unscored), with the judge's raw text in both orders.
    db["eval_comparisons"].create(
        {"id": int, "round": int, "model": str, "baseline": str, "answer_id": int, "baseline_answer_id": int,
         "judge": str, "preference": float, "outcome": str, "ab_score": float, "ba_score": float, "ab_raw": str,
         "ba_raw": str, "template_sha": str, "created_at": str},
        pk="id", foreign_keys=[("answer_id", "eval_answers", "id"), ("baseline_answer_id", "eval_answers", "id")])
    db["eval_comparisons"].create_index(["round"])
    # The promotion gate: whether M_t became the next round's parent, and why.
    db["promotions"].create(
        {"id": int, "round": int, "model": str, "promoted": int, "parent": str, "metric": str, "value": float,
         "lo": float, "hi": float, "reason": str, "created_at": str},
        pk="id")
    db["promotions"].create_index(["round"], unique=True)
    append_only(db, APPEND_ONLY_M011, kinds=("no_update", "no_delete", "no_replace"))


# The settings that were 'yes'/'no' strings before the config was typed, and are bools since.
M012_BOOLS = ("api_send_seed", "vllm_prefix_caching", "meta_rewarding", "consistency")


@migrations()
def m012_config_keys(db: sqlite_utils.Database):
    # The config typed: the first days' key names become today's (a new name, where a run has both,
    # wins), yes/no strings of the settings in M012_BOOLS become JSON booleans, and the run's
    # config.toml is written again from the converted rows, so neither needs a shim to be read.
    from selfreward.config import FIELDS, RENAMED_KEYS

    rows = {r["key"]: json.loads(r["value"]) for r in db["config"].rows}
    values = {RENAMED_KEYS[k]: v for k, v in rows.items() if k in RENAMED_KEYS}
    values.update({k: v for k, v in rows.items() if k not in RENAMED_KEYS})
    for key in M012_BOOLS:
        if values.get(key) in ("yes", "no"):
            values[key] = values[key] == "yes"
    if values == rows:
        return
    db["config"].delete_where()
    db["config"].insert_all({"key": k, "value": json.dumps(v)} for k, v in values.items())
    main = next((row[2] for row in db.execute("pragma database_list") if row[1] == "main"), "")
    toml = Path(main).parent / "config.toml" if main else None
    if toml is not None and toml.is_file():
        stored = Config(**{k: v for k, v in values.items() if k in FIELDS})
        tmp = toml.with_name(".config.toml.m012")
        tmp.write_text(to_toml(stored), encoding="utf-8")
        os.replace(tmp, toml)


@migrations()
def m013_views(db: sqlite_utils.Database):
    # The queries status, report, verify, export and browse would otherwise each write again. A kept pair
    # with its texts and lengths; the loop's own judgments (human labels from import-labels sit beside
    # them in `judgments`, but pairs and the charts are about the model judging itself); the labels.
    db.create_view("pair_texts", """
        select x.id as pair_id, x.round, x.prompt_id, x.status, x.chosen_id, x.rejected_id, x.chosen_score,
               x.rejected_score, p.text as prompt, c.text as chosen, r.text as rejected,
               c.n_tokens as chosen_tokens, r.n_tokens as rejected_tokens
        from pairs x join prompts p on p.id = x.prompt_id
        join candidates c on c.id = x.chosen_id join candidates r on r.id = x.rejected_id""")
    db.create_view("model_judgments", "select * from judgments where judge not like 'human:%'")
    db.create_view("human_judgments", "select * from judgments where judge like 'human:%'")
    # Each candidate as the model judged it: samples, those that parsed, and their mean and spread.
    db.create_view("candidate_scores", """
        select candidate_id, round, count(*) as samples, count(score) as parsed, avg(score) as mean,
               max(score) - min(score) as spread
        from model_judgments group by candidate_id""")


def take_lock(path: Path, wait: bool = False, quiet: bool = False):
    """The run's lock (an flock on runs/<name>/.lock): one writer per run."""
    fh = open(path / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.close()
        if quiet:
            return None
        raise SelfRewardError(f"run {path} is in use by another selfreward process (iterate, eval or "
                              f"import-labels); wait for it to finish") from None
    return fh


def release_lock(fh) -> None:
    if fh is not None:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class PeakMemory:
    """Samples this process's resident memory in a thread, so each stage gets its own peak."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval):
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


# A reader (status, browse, a long export) never makes a stage commit fail: WAL lets
# readers and the one writer work at once, and a busy writer is waited for, not fatal.
BUSY_TIMEOUT_S = 60.0


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(value):
    """Text SQLite can store: a lone surrogate (a model's reply can hold one, as a JSON escape from an API)
    becomes U+FFFD. SQLite refuses to encode it, so the same seeded reply failed its stage on every resume."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return _SURROGATE.sub("\ufffd", value)
    return value


class Database(sqlite_utils.Database):
    """sqlite_utils' Database; every statement's text parameters pass through `storable` on the way in."""

    def execute(self, sql, parameters=None):
        if isinstance(parameters, dict):
            parameters = {k: storable(v) for k, v in parameters.items()}
        elif parameters is not None:
            parameters = [storable(v) for v in parameters]
        return super().execute(sql, parameters)


def connect(db_path: Path, writer: bool) -> sqlite_utils.Database:
    if writer:
        conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_S)
    else:
        # Auditing a run must not change it: a reader's connection cannot write, even by accident.
        conn = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    if writer:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
    return Database(conn)


class Run:
    """A run folder: run.db, config.toml, models/.

    Writers (`iterate`, `eval`, `import-labels`) open it with `writer=True`: they take
    the run's lock first, then migrate and write; a second writer gets one clear line.
    Readers never wait for the lock and open run.db read-only: a run with an older
    schema is refused with one line (a writer upgrades it), so auditing never changes
    the evidence.
    """

    def __init__(self, path: Path, db: sqlite_utils.Database, lock=None):
        self.path = path
        self.db = db
        self._lock = lock
        self._inputs_seen: dict = {}

    # --- opening ---
    @classmethod
    def open(cls, path: str | Path, writer: bool = False) -> "Run":
        path = Path(path)
        if not (path / "run.db").is_file():
            raise SelfRewardError(f"no run at {path} (expected {path / 'run.db'})")
        lock = take_lock(path) if writer else None
        try:
            db = connect(path / "run.db", writer)
            if writer:
                migrations.apply(db)
            elif migrations.pending(db):
                db.close()
                raise SelfRewardError(f"run {path}: old schema: a writer upgrades it (iterate, eval, train-rm or "
                                      f"import-labels); readers never change a run, so to keep this one as it is, "
                                      f"upgrade a copy")
        except sqlite3.DatabaseError as e:
            release_lock(lock)
            if getattr(e, "sqlite_errorname", "") not in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                raise
            raise SelfRewardError(f"{path / 'run.db'} is damaged or not a run database ({e}); restore it from "
                                  f"a copy") from None
        except BaseException:
            release_lock(lock)
            raise
        return cls(path, db, lock)

    @classmethod
    def create(cls, path: str | Path, config: Config) -> "Run":
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SelfRewardError(f"cannot create the run folder {path}: {e.strerror}") from None
        # One creator at a time in a runs folder: two first `iterate`s of one name must not both build it.
        # The lock is on the runs folder itself, so it leaves no file behind.
        try:
            creating = os.open(path.parent, os.O_RDONLY)
        except OSError as e:
            raise SelfRewardError(f"cannot create the run folder {path}: {e.strerror}") from None
        try:
            fcntl.flock(creating, fcntl.LOCK_EX)
            if (path / "run.db").is_file():
                raise SelfRewardError(f"run {path} was created by another selfreward process meanwhile; "
                                      f"run the command again to resume it")
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise SelfRewardError(f"cannot create the run folder {path}: something that is not a run is "
                                      f"there; move it away or choose another --name")
            cls._build(path, config)
            return cls.open(path, writer=True)  # the run's own lock before the creation lock goes
        finally:
            os.close(creating)  # and its flock with it

    @staticmethod
    def _build(path: Path, config: Config) -> None:
        """Build the run in a folder of our own beside it and rename it into place, so a failure
        never leaves a half-made run. The stage's name starts with '.', which no run name may, and
        only what this process made is ever removed."""
        import shutil
        import tempfile

        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".creating", dir=path.parent))
        except OSError as e:
            raise SelfRewardError(f"cannot create the run folder {path}: {e.strerror}") from None
        try:
            tmp = stage / path.name
            (tmp / "models").mkdir(parents=True)
            db = connect(tmp / "run.db", writer=True)
            migrations.apply(db)
            with db.atomic():
                db["config"].insert_all({"key": k, "value": json.dumps(v)} for k, v in as_dict(config).items())
                db["config"].insert({"key": "_created_by", "value": json.dumps(f"selfreward {__version__}")})
                db["config"].insert({"key": INPUTS_KEY, "value": json.dumps(input_hashes(config))})
            db.close()
            (tmp / "config.toml").write_text(to_toml(config), encoding="utf-8")
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise SelfRewardError(f"cannot create the run folder {path}: {e.strerror}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def check_inputs(self, keys=INPUT_KEYS) -> None:
        """Refuse to go on when an input file differs from the one the run was created with."""
        from selfreward.data import file_sha256

        row = self.db.execute("select value from config where key = ?", [INPUTS_KEY]).fetchone()
        for key, recorded in (json.loads(row[0]) if row else {}).items():  # runs made before: nothing recorded
            if key not in keys:
                continue
            path = recorded["path"]
            try:
                stat = os.stat(path)
                seen = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                raise SelfRewardError(f"{key} file {path} of run {self.path} is missing; restore it (sha256 "
                                      f"{recorded['sha256']}) to resume") from None
            if self._inputs_seen.get(key) == seen:
                continue  # unchanged since it was last hashed
            actual = file_sha256(path)
            if actual != recorded["sha256"]:
                raise SelfRewardError(f"{key} file {path} has changed since run {self.path} was created (sha256 "
                                      f"{actual[:16]}, recorded {recorded['sha256'][:16]}); restore it, or start "
                                      f"a new run with the new data")
            self._inputs_seen[key] = seen

    def close(self) -> None:
        self.db.close()
        release_lock(self._lock)
        self._lock = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def config_values(self) -> dict:
        """The stored config (an old run's keys and values were brought to today's by m012_config_keys)."""
        return {r["key"]: json.loads(r["value"]) for r in self.db["config"].rows if not r["key"].startswith("_")}

    def config(self) -> Config:
        values = self.config_values()
        # Keys added by later versions fall back to their defaults.
        from selfreward.config import FIELDS

        return Config(**{k: v for k, v in values.items() if k in FIELDS})

    def set_config(self, key: str, value) -> None:
        with self.db.atomic():
            self.db["config"].upsert({"key": key, "value": json.dumps(value)}, pk="key")
        (self.path / "config.toml").write_text(to_toml(self.config()), encoding="utf-8")

    # --- stages ---
    def stage_done(self, round: int, stage: str) -> bool:
        return bool(self.db.execute("select 1 from stages where round=? and stage=?", [round, stage]).fetchone())

    @contextmanager
    def stage(self, round: int, stage: str):
        """Time a stage and hand it a Commit; its writes land in one transaction at the end."""
        from selfreward import failpoints

        self.check_inputs()
        started, t0 = now(), time.perf_counter()
        commit = StageCommit()
        failpoints.enter(f"r{round}:{stage}")
        failpoints.hit("start")
        with PeakMemory() as mem:
            yield commit
        self.check_inputs()  # the stage read them: an edit during it must not reach its rows
        with self.db.atomic():
            for fn in commit.writes:
                fn(self.db)
            failpoints.hit("mid-commit")
            self.db["stages"].insert({
                "round": round, "stage": stage, "started_at": started, "finished_at": now(),
                "wall_s": round_(time.perf_counter() - t0), "peak_rss_mb": round_(mem.peak / 2**20),
                "detail": json.dumps(commit.detail),
            })
            # The stage's outputs are in; its checkpointed generations are no longer needed.
            self.db.execute("delete from generation_checkpoint")
        failpoints.enter("")

    def model(self, name: str) -> dict:
        row = self.db.execute("select * from models where name=?", [name]).fetchone()
        if row is None:
            raise SelfRewardError(f"model {name} is not in run {self.path}")
        cols = [d[0] for d in self.db.execute("select * from models limit 0").description]
        model = dict(zip(cols, row))
        # Weights inside the run folder are stored relative to it, so a run can be moved or
        # opened from any working directory. A relative path is always the run's own: resolved
        # even when missing, so that a lost folder is reported, never mistaken for a hub id.
        for key in ("path", "adapter_path"):
            if model[key] and not Path(model[key]).is_absolute() and (
                    (self.path / model[key]).exists() or model[key].startswith("models/")):
                model[key] = str((self.path / model[key]).resolve())
        return model

    def model_path(self, name: str) -> str:
        """Where to load model `name` from, after checking that its folder holds the recorded weights."""
        from selfreward.backends.models import check_weights

        model = self.model(name)
        path = model["path"]
        if Path(path).is_absolute() or Path(path).exists():
            check_weights(name, Path(path), model["sha256"])
        return path  # otherwise a hub id, which nobody here hashed

    def relative(self, path) -> str:
        """How a path is stored: relative to the run folder when it lies inside it."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.path.resolve()))
        except ValueError:
            return str(path)

    def rows(self, sql: str, params=()) -> list[dict]:
        cur = self.db.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


class StageCommit:
    """What a stage will write: a list of callables run inside the stage's transaction."""

    def __init__(self):
        self.writes = []
        self.detail: dict = {}

    def add(self, fn):
        self.writes.append(fn)

    def insert_all(self, table: str, rows: list[dict]):
        self.writes.append(lambda db: db[table].insert_all(rows))


def round_(x: float) -> float:
    return round(x, 3)
