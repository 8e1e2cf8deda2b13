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
