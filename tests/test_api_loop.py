"""The loop with an API judge on 127.0.0.1: secrets stay out of the run, and an
unreachable API is one clear error that leaves the run resumable."""

import socket

from click.testing import CliRunner
from test_api_judge import ScriptedServer

from selfreward.cli import cli
from selfreward.core.store import Run

SECRET = "sk-test-do-not-store-4242"


def args(tmp_path, tiny_model, seed_files, url):
    return ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "api", "--model", str(tiny_model),
            "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(seed_files["eft"]),
            "--preset", "tiny", "--judge", "api", "--judge-api-base", url, "--judge-api-model", "judge",
            "--set", "judge_api_key_env=SR_TEST_KEY", "--set", "judge_api_concurrency=2",
            "--set", "judge_api_max_retries=1", "--set", "judge_api_timeout=5", "--rounds", "2"]


def test_api_judge_drives_the_loop_and_the_key_is_never_stored(tmp_path, tiny_model, seed_files, monkeypatch):
    monkeypatch.setenv("SR_TEST_KEY", SECRET)
    script = [{"content": f"Judged. Score: {k % 6}"} for k in range(80)]
    with ScriptedServer(script) as srv:
        result = CliRunner().invoke(cli, args(tmp_path, tiny_model, seed_files, srv.url), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(r["auth"] == f"Bearer {SECRET}" for r in srv.requests)
    run = Run.open(tmp_path / "runs" / "api")
    judgments = run.rows("select * from judgments")
    assert judgments and all(j["judge"] == "api:judge" for j in judgments)
    assert all(j["prompt_tokens"] == 100 and j["completion_tokens"] == 7 for j in judgments)
    run.db.close()
    for path in (tmp_path / "runs" / "api").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.output


def test_unreachable_api_is_one_line_and_resumable(tmp_path, tiny_model, seed_files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(cli, args(tmp_path, tiny_model, seed_files, f"http://127.0.0.1:{port}/v1"))
    assert result.exit_code == 1
    assert "API at" in result.output and "unreachable" in result.output
    assert "Traceback" not in result.output
    run = Run.open(tmp_path / "runs" / "api")
    assert run.db["stages"].count == 0 and run.db["eft_eval"].count == 0  # nothing half-written
