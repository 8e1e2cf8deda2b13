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


def test_one_process_per_run(run):
    with run.locked():
        with pytest.raises(SelfRewardError, match="in use"):
            with Run.open(run.path).locked():
                pass
