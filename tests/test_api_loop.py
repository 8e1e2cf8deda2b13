"""The loop with an API judge on 127.0.0.1: secrets stay out of the run, and an
unreachable API is one clear error that leaves the run resumable."""

import collections
import hashlib
import json
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
            "--set", "api_key_env=SR_TEST_KEY", "--set", "api_concurrency=2",
            "--set", "api_max_retries=1", "--set", "api_timeout=5", "--rounds", "2"]


def test_api_judge_drives_the_loop_and_the_key_is_never_stored(tmp_path, tiny_model, seed_files, monkeypatch):
    monkeypatch.setenv("SR_TEST_KEY", SECRET)
    script = [{"content": f"Judged. Score: {k % 6}", "model": "judge-2026-11"} for k in range(80)]
    with ScriptedServer(script) as srv:
        result = CliRunner().invoke(cli, args(tmp_path, tiny_model, seed_files, srv.url), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(r["auth"] == f"Bearer {SECRET}" for r in srv.requests)
    run = Run.open(tmp_path / "runs" / "api")
    judgments = run.rows("select * from judgments")
    assert judgments and all(j["judge"] == "api:judge" for j in judgments)
    assert all(j["prompt_tokens"] == 100 and j["completion_tokens"] == 7 for j in judgments)
    # Where each judgment came from: the server, and the model it reported (not the name asked for).
    assert all(j["endpoint"] == srv.url and j["served_model"] == "judge-2026-11" for j in judgments)
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


def by_prompt(body: dict) -> dict:
    """A reply from the prompt alone (so that the order of concurrent requests cannot change a
    run), after 0.2 s: a verdict for a pairwise prompt, a score for an additive one."""
    prompt = body["messages"][-1]["content"]
    k = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    if "<response_a>" in prompt:
        return {"delay": 0.2, "content": f"Compared.\nVerdict: {'AB'[k % 2]}"}
    return {"delay": 0.2, "content": f"Judged. Score: {k % 6}"}


def overlapped(requests: list[dict]) -> bool:
    """Whether a pairwise and an additive request were in flight at the same time."""
    pairwise = [r for r in requests if "<response_a>" in r["body"]["messages"][-1]["content"]]
    additive = [r for r in requests if r not in pairwise]
    return any(p["start"] < a["end"] and a["start"] < p["end"] for p in pairwise for a in additive)


def test_eval_probes_judge_at_once_on_a_server_as_they_would_one_by_one(tmp_path, tiny_model, seed_files,
                                                                         monkeypatch):
    """The eval stage's parts run together against a server (the position probe's pairwise requests in
    flight with the held-out judging), each asked once (the verbosity probe's unpadded answers come back
    from the checkpoint, written from another thread), and the stored metrics and judgments are those
    of the same stage run one part after the other."""
    from selfreward.core.stages import judge_eval

    monkeypatch.setenv("SR_TEST_KEY", SECRET)
    ranked = tmp_path / "ranked.jsonl"  # two prompts, three answers each, ranked 0 (best) to 2
    ranked.write_text("".join(json.dumps({"instruction": f"Explain {w} briefly",
                                          "responses": [{"text": f"{w}: a clear, correct account.", "rank": 0},
                                                        {"text": f"{w} is a thing.", "rank": 1},
                                                        {"text": "No idea.", "rank": 2}]}) + "\n"
                              for w in ("tides", "rust")))
    extra = ["--rounds", "1", "--eft-eval", str(ranked), "--set", "eval_eft_size=0", "--set", "eval_bias_prompts=2",
             "--set", "api_concurrency=10"]
    # Ten slots for a wave of at most eight requests (six held-out scores, the probe's two pairs in both
    # orders): whichever part's requests reach the client's queue first, the other part's are sent at once
    # rather than after the first part's replies, so that the overlap is the stage's doing, not a race.
    tables = {}
    for name, parallel in (("together", None), ("in_order", False)):
        together = judge_eval.together
        if parallel is False:
            monkeypatch.setattr(judge_eval, "together", lambda calls, parallel: together(calls, False))
        with ScriptedServer([], answer=by_prompt) as srv:
            argv = args(tmp_path, tiny_model, seed_files, srv.url)
            argv[argv.index("--name") + 1] = name
            result = CliRunner().invoke(cli, argv + extra, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        prompts = [r["body"]["messages"][-1]["content"] for r in srv.requests]
        run = Run.open(tmp_path / "runs" / name)
        tables[name] = (run.rows("select round, model, name, value from metrics order by round, model, name"),
                        run.rows("select round, model, example, score, raw from eft_eval order by round, model, example"),
                        sorted(prompts))
        assert overlapped(srv.requests) == (parallel is None)
        # Nothing asked twice in a stage: the API judge asks the same of M0's and of M1's eval stage.
        assert set(collections.Counter(prompts).values()) == {2}
        run.db.close()
    assert tables["together"] == tables["in_order"]
    metrics = {r["name"] for r in tables["together"][0]}
    assert {"bias_position_n", "bias_verbosity_n", "eft_parse_rate"} <= metrics
