import pytest

from selfreward.config import resolve
from selfreward.errors import SelfRewardError
from selfreward.core.store import Run


@pytest.fixture
def run(tmp_path):
    return Run.create(tmp_path / "r", resolve({}, {"preset": "tiny"}))


def test_create_writes_config_and_schema(run):
    assert (run.path / "config.toml").is_file()
    assert run.config().preset == "tiny"
    tables = set(run.db.table_names())
    assert {"config", "rounds", "stages", "models", "prompts", "candidates", "judgments", "pairs",
            "training_steps", "eft_eval", "metrics", "_sqlite_migrations"} <= tables
    assert not (run.path.parent / "r.creating").exists()


def test_a_failed_stage_writes_nothing(run):
    with pytest.raises(RuntimeError):
        with run.stage(2, "candidates") as commit:
            commit.insert_all("prompts", [{"round": 2, "text": "x", "source": "t", "created_at": "now"}])
            raise RuntimeError("killed mid-stage")
    assert not run.stage_done(2, "candidates")
    assert run.db["prompts"].count == 0


def test_a_stage_write_that_fails_rolls_back_whole(run):
    def boom(db):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        with run.stage(2, "pairs") as commit:
            commit.insert_all("prompts", [{"round": 2, "text": "x", "source": "t", "created_at": "now"}])
            commit.add(boom)
    assert run.db["prompts"].count == 0 and not run.stage_done(2, "pairs")


def test_a_finished_stage_is_marked_with_its_rows(run):
    with run.stage(2, "self_instruct") as commit:
        commit.insert_all("prompts", [{"round": 2, "text": "x", "source": "t", "created_at": "now"}])
        commit.detail = {"kept": 1}
    assert run.stage_done(2, "self_instruct")
    (stage,) = run.rows("select * from stages")
    assert stage["wall_s"] >= 0 and stage["peak_rss_mb"] > 0


def test_open_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(SelfRewardError, match="no run at"):
        Run.open(tmp_path / "nope")


def test_one_writer_per_run_and_readers_never_wait(run):
    # `run` (from Run.create) is a writer and holds the lock.
    with pytest.raises(SelfRewardError, match="in use by another selfreward process"):
        Run.open(run.path, writer=True)
    with Run.open(run.path) as reader:  # status, show, browse: no lock needed
        assert reader.config().preset == "tiny"
    run.close()
    with Run.open(run.path, writer=True):
        pass


def test_a_long_reader_does_not_fail_a_stage_commit(run):
    import sqlite3

    assert run.db.execute("pragma journal_mode").fetchone()[0] == "wal"
    # Another process's long read: an open read transaction on its own connection.
    reader = sqlite3.connect(str(run.path / "run.db"))
    reader.execute("begin")
    assert reader.execute("select count(*) from prompts").fetchone() == (0,)
    with run.stage(2, "self_instruct") as commit:  # under the rollback journal this waits, then fails
        commit.insert_all("prompts", [{"round": 2, "text": "x", "source": "t", "created_at": "now"}])
    assert reader.execute("select count(*) from prompts").fetchone() == (0,)  # its snapshot is consistent
    reader.rollback()
    assert reader.execute("select count(*) from prompts").fetchone() == (1,)
    reader.close()


def test_writers_refuse_a_run_in_use(judged_run, tmp_path):
    from click.testing import CliRunner

    from selfreward.cli import cli

    run_dir = str(judged_run.path)
    judged_run.close()
    holder = Run.open(run_dir, writer=True)  # as a running `iterate` would
    try:
        for args in (["eval", "judge", run_dir, "--limit", "1"], ["import-labels", run_dir, str(tmp_path / "x.json")],
                     ["eval", "head2head", run_dir, "--a", "M1", "--b", "M2"]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 1, result.output
            assert "in use by another selfreward process" in result.output
            assert len(result.output.strip().splitlines()) == 1
        status = CliRunner().invoke(cli, ["status", run_dir])  # readers go on
        assert status.exit_code == 0
    finally:
        holder.close()


def test_creating_a_run_never_touches_a_folder_it_did_not_make(tmp_path):
    # `exp.creating` is a valid run name: creating `exp` used to wipe it as its own scratch folder.
    config = resolve({}, {"preset": "tiny"})
    other = Run.create(tmp_path / "exp.creating", config)
    other.db["prompts"].insert({"round": 2, "text": "keep me", "source": "t", "created_at": "now"})
    other.close()
    (tmp_path / "exp.creating" / "models" / "M1").mkdir()
    Run.create(tmp_path / "exp", config).close()
    with Run.open(tmp_path / "exp.creating") as kept:
        assert [r["text"] for r in kept.rows("select text from prompts")] == ["keep me"]
    assert (tmp_path / "exp.creating" / "models" / "M1").is_dir()
    # Nothing of the build is left beside the runs, and its scratch name can never be a run's.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "exp.creating"]


def test_a_folder_in_the_way_is_one_clear_error(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "notes.txt").write_text("mine")
    with pytest.raises(SelfRewardError, match="something that is not a run is there"):
        Run.create(tmp_path / "exp", resolve({}, {"preset": "tiny"}))
    assert (tmp_path / "exp" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exp")] == []


CREATE_MANY = """
import json, sys
from pathlib import Path
from selfreward.config import resolve
from selfreward.core.store import Run
from selfreward.errors import SelfRewardError

runs, go, me = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
config = resolve({}, {"preset": "tiny", "seed": me})
while not go.exists():
    pass
for k in range(int(sys.argv[4])):
    try:
        Run.create(runs / f"exp{k}", config).close()
        print(json.dumps([k, "created"]), flush=True)
    except SelfRewardError as e:
        print(json.dumps([k, "refused: " + str(e)]), flush=True)
"""


def test_two_processes_creating_one_run_name(tmp_path):
    """Two first `iterate`s of the same names, as real processes started together: for each name one
    creates the run, the other is told in one line, and the run is whole (the winner's config)."""
    import json
    import os
    import subprocess
    import sys

    runs, go, n = tmp_path / "runs", tmp_path / "go", 12
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", CREATE_MANY, str(runs), str(go), str(me), str(n)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in (1, 2)]
    import time

    time.sleep(3)  # both imported and spinning on the start file
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
    results = [dict(json.loads(line) for line in out.splitlines()) for out, _ in outs]
    for k in range(n):
        said = sorted([results[0][k], results[1][k]])
        assert said[0] == "created", said
        assert said[1].startswith("refused: ") and "created by another selfreward process meanwhile" in said[1]
        winner = 1 if results[0][k] == "created" else 2
        with Run.open(runs / f"exp{k}") as r:
            assert r.config().seed == winner
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"exp{k}" for k in range(n))


def test_an_input_file_edited_after_creation_is_refused(tmp_path, seed_files):
    config = resolve({}, {"preset": "tiny", "ift": str(seed_files["ift"]), "eft": str(seed_files["eft"]),
                          "eft_eval": str(seed_files["eft"])})
    run = Run.create(tmp_path / "r", config)
    with run.stage(2, "self_instruct"):
        pass
    original = seed_files["ift"].read_bytes()
    seed_files["ift"].write_bytes(original.replace(b"pump", b"pomp"))  # the same size
    with pytest.raises(SelfRewardError, match=r"ift file .* has changed since run .* was created"):
        with run.stage(2, "candidates"):
            pass
    seed_files["ift"].write_bytes(original)
    # An edit while a stage runs (it read the file then) keeps the stage from committing.
    with pytest.raises(SelfRewardError, match="eft file"):
        with run.stage(2, "candidates") as commit:
            commit.insert_all("prompts", [{"round": 2, "text": "x", "source": "t", "created_at": "now"}])
            seed_files["eft"].write_text(seed_files["eft"].read_text() + "\n")
    assert not run.stage_done(2, "candidates") and run.db["prompts"].count == 0
    seed_files["eft"].unlink()
    with pytest.raises(SelfRewardError, match="is missing; restore it"):
        with run.stage(2, "candidates"):
            pass


def test_a_hub_model_is_pinned_to_its_revision_at_registration(tmp_path, tiny_model, seed_files, judge_script,
                                                               monkeypatch):
    """A hub id resolves, when the run registers M0, to the snapshot of the revision `main` names then;
    the run records that folder (its name is the commit) and its weights' hash, and loads it even after
    `main` moves. (No hub here: a cache laid out as huggingface_hub lays it out, used offline.)"""
    import shutil

    import huggingface_hub
    from click.testing import CliRunner

    from selfreward.backends.models import weights_sha
    from selfreward.cli import cli
    from conftest import build_tiny_model

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-chat"
    first, second = "1" * 40, "2" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / first)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "hub", "--preset", "tiny", "--rounds", "1",
            "--model", "someone/tiny-chat", "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
            "--eft-eval", "", "--judge", "scripted", "--judge-script", str(judge_script)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    # The repo moves on: `main` now names other weights.
    build_tiny_model(repo / "snapshots" / second, seed=1)
    (repo / "refs" / "main").write_text(second)
    with Run.open(tmp_path / "runs" / "hub") as run:
        m0 = run.model("M0")
        assert m0["path"] == str(repo / "snapshots" / first) == run.model_path("M0")
        assert m0["sha256"] == weights_sha(repo / "snapshots" / first) != weights_sha(repo / "snapshots" / second)
        assert m0["note"] == f"source: someone/tiny-chat (hub revision {first})"


def test_a_hub_judge_model_is_pinned_to_its_revision_at_creation(tmp_path, tiny_model, seed_files, monkeypatch):
    """A reward-model judge given as a hub id is pinned as M0 is: the run records its snapshot folder,
    each judgment the hash of that folder, and a resume that names the hub id again is the same run,
    even after `main` moves. (Before: the hub id was stored as given, loaded at its newest revision
    each time, and the judgments recorded no hash.)"""
    import shutil

    import huggingface_hub
    from click.testing import CliRunner

    from selfreward.backends.models import weights_sha
    from selfreward.cli import cli
    from test_reward_model import write_classifier

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-rm"
    first, second = "1" * 40, "2" * 40
    write_classifier(tiny_model, repo / "snapshots" / first, num_labels=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "rm", "--preset", "tiny", "--model",
            str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "",
            "--judge", "reward-model", "--set", "judge_model=someone/tiny-rm"]
    result = CliRunner().invoke(cli, [*args, "--rounds", "1"])
    assert result.exit_code == 0, result.output
    shutil.copytree(repo / "snapshots" / first, repo / "snapshots" / second)
    write_classifier(tiny_model, repo / "snapshots" / second, num_labels=1, rms_norm_eps=1e-3)
    (repo / "refs" / "main").write_text(second)
    result = CliRunner().invoke(cli, [*args, "--rounds", "2"])
    assert result.exit_code == 0, result.output
    pinned = repo / "snapshots" / first
    with Run.open(tmp_path / "runs" / "rm") as run:
        assert run.config().judge_model == str(pinned)
        shas = {r["judge_model_sha"] for r in run.rows("select judge_model_sha from judgments")}
    assert shas == {weights_sha(pinned)} and weights_sha(pinned) != weights_sha(repo / "snapshots" / second)


def test_a_reply_with_a_lone_surrogate_is_stored(run):
    # An API's JSON can carry "\ud800": SQLite refuses to encode it, and the seeded reply failed every resume.
    text = "fine so far \ud800 and after"
    with run.stage(2, "candidates") as commit:
        commit.insert_all("prompts", [{"id": 1, "round": 2, "text": "p \udfff", "source": "t", "created_at": "now"}])
        commit.insert_all("candidates", [{"round": 2, "prompt_id": 1, "idx": 0, "text": text, "n_tokens": 5}])
    assert run.rows("select text from candidates") == [{"text": "fine so far \ufffd and after"}]
    assert run.rows("select text from prompts") == [{"text": "p \ufffd"}]
    assert run.rows("select text from candidates where text = ?", ["fine so far \ud800 and after"])


def test_eval_judge_refuses_the_runs_eval_set_once_edited(judged_run, seed_files):
    from click.testing import CliRunner

    from selfreward.cli import cli

    run_dir = str(judged_run.path)
    judged_run.close()
    with seed_files["eft"].open("a") as fh:  # the run's eft_eval (and eft)
        fh.write('{"instruction": "i", "response": "r", "justification": "j", "score": 5}\n')
    for args in (["eval", "judge", run_dir, "--limit", "1"], ["train-rm", run_dir]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert "eft_eval file" in result.output and "has changed since run" in result.output


def old_run(run) -> None:
    """Make `run` look as a run written before m010: its triggers and migration record gone."""
    import sqlite3

    run.close()
    db = sqlite3.connect(run.path / "run.db")
    db.execute("delete from _sqlite_migrations where name = 'm010_refuse_replace'")
    for (name,) in db.execute("select name from sqlite_master where type = 'trigger' and name like '%_no_replace'"
                              ).fetchall():
        db.execute(f"drop trigger {name}")
    db.commit()
    db.close()


def test_readers_never_migrate_an_old_run_and_say_so(run, tmp_path):
    import hashlib

    from click.testing import CliRunner

    from selfreward.cli import cli

    old_run(run)
    db_file = run.path / "run.db"
    before = hashlib.sha256(db_file.read_bytes()).hexdigest()
    for args in (["status"], ["show"], ["verify"], ["rationales"], ["report"], ["browse"],
                 ["export", "--round", "2", "--out", str(tmp_path / "x.jsonl")]):
        result = CliRunner().invoke(cli, [args[0], str(run.path), *args[1:]])
        assert result.exit_code == 1, (args, result.output)
        assert "old schema: a writer upgrades it" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert hashlib.sha256(db_file.read_bytes()).hexdigest() == before  # auditing left the evidence as it was
    with Run.open(run.path, writer=True) as writer:  # a writer upgrades it
        names = {n for (n,) in writer.db.execute("select name from sqlite_master where type = 'trigger'")}
        assert {"candidates_no_replace", "judgments_no_replace", "consistency_judgments_no_replace"} <= names
    with Run.open(run.path) as reader:
        assert reader.config().preset == "tiny"


def test_a_reader_cannot_write(run):
    import sqlite3

    run.close()
    with Run.open(run.path) as reader:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.db.execute("insert into prompts (round, text) values (1, 'x')")


def test_the_actors_eval_sets_are_inputs_of_the_run_too(tmp_path, seed_files):
    """An edited verifiable-instruction set (or win-rate set, with an eval judge) would silently change
    every later model's yardstick: it is hashed at creation and checked like the training data."""
    import json
    import shutil

    from selfreward.config import SEED_DIR

    if_eval, win_eval = tmp_path / "if.jsonl", tmp_path / "win.jsonl"
    shutil.copy(SEED_DIR / "if_eval.jsonl", if_eval)
    shutil.copy(SEED_DIR / "ift_heldout.jsonl", win_eval)
    base = {"preset": "tiny", "ift": str(seed_files["ift"]), "eft": str(seed_files["eft"]), "eft_eval": "",
            "if_eval": str(if_eval), "win_eval": str(win_eval)}
    without_judge = Run.create(tmp_path / "a", resolve({}, base))
    recorded = without_judge.db.execute("select value from config where key = '_inputs'").fetchone()[0]
    assert set(json.loads(recorded)) == {"ift", "eft", "if_eval"}  # win_eval is read only by an eval judge
    judged = Run.create(tmp_path / "b", resolve({}, {**base, "eval_judge": "pairrm"}))
    for path, key in ((if_eval, "if_eval"), (win_eval, "win_eval")):
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        with pytest.raises(SelfRewardError, match=rf"{key} file .* has changed since run"):
            with judged.stage(2, "actor_M2"):
                pass
        path.write_bytes(original)
