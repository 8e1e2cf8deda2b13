"""A stage killed half-way keeps the generations it finished: the resumed stage
generates (or pays for) only the rest, and still commits in one transaction."""

import pytest
from click.testing import CliRunner
from test_api_judge import ScriptedServer

from selfreward.cli import cli
from selfreward.backends.engines.hf import TransformersEngine
from selfreward.core.store import Run


PROMPTS = ["Explain how tides work in two sentences", "List three uses of vinegar at home",
           "Write a short note thanking a neighbour", "Compare walking and cycling to work"]


@pytest.fixture(autouse=True)
def fixed_prompts(monkeypatch):
    # Self-instruction is tested on its own; here the round's prompts are fixed so the chunk counts are known.
    from selfreward.core.stages import self_instruct

    monkeypatch.setattr(self_instruct, "self_instruct",
                        lambda engine, template, ift, generated, want, sampling, cfg: (PROMPTS, {"kept": 4}))


def iterate(tmp_path, tiny_model, seed_files, *extra):
    args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "c", "--model", str(tiny_model),
            "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "", "--preset", "tiny",
            "--rounds", "2", "--set", "prompts_per_round=3", "--set", "n_candidates=2",
            "--set", "gen_batch_size=1", "--engine", "transformers", *extra]  # 4 * 1 // 2 = 2 prompts per checkpointed chunk
    return CliRunner().invoke(cli, args)


def test_engine_chunks_survive_a_kill(tmp_path, tiny_model, seed_files, judge_script, monkeypatch):
    real = TransformersEngine.generate
    calls = []

    def flaky(self, prompts, n, sampling, desc="generate", on_done=None):
        if desc.startswith("round 2 candidates"):
            calls.append(len(prompts))
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed after the first chunk was kept
        return real(self, prompts, n, sampling, desc, on_done)

    monkeypatch.setattr(TransformersEngine, "generate", flaky)
    scripted = ("--judge", "scripted", "--judge-script", str(judge_script))
    result = iterate(tmp_path, tiny_model, seed_files, *scripted)
    assert result.exit_code == 130
    run = Run.open(tmp_path / "runs" / "c")
    assert not run.stage_done(2, "candidates") and run.db["candidates"].count == 0
    kept = run.db["generation_checkpoint"].count
    assert calls[0] == 2 and kept == 4  # the first chunk: two prompts, two samples each

    calls.clear()
    result = iterate(tmp_path, tiny_model, seed_files, *scripted)
    assert result.exit_code == 0, result.output
    n_prompts = run.db["prompts"].count_where("round = 2")
    assert n_prompts == 4 and calls == [2]  # only the two prompts not kept were generated again
    assert run.db["candidates"].count == 2 * n_prompts
    assert run.db["generation_checkpoint"].count == 0  # emptied when the stages committed


def test_paid_api_answers_are_not_asked_again(tmp_path, tiny_model, seed_files):
    api = ["--judge", "api", "--judge-api-model", "judge", "--set", "api_concurrency=1",
           "--set", "api_max_retries=0", "--set", "judge_samples=1"]
    # Three answers, then a server error with no retries left: the judge stage fails after paying for three requests.
    with ScriptedServer([{"content": "Score: 4", "model": "judge-v1"}] * 3 + [{"status": 503}]) as srv:
        first = iterate(tmp_path, tiny_model, seed_files, *api, "--judge-api-base", srv.url)
    first_url = srv.url
    assert first.exit_code == 1 and "HTTP 503" in first.output
    run = Run.open(tmp_path / "runs" / "c")
    assert run.db["generation_checkpoint"].count == 3 and not run.stage_done(2, "judge")
    n_candidates = run.db["candidates"].count_where("round = 2")

    with ScriptedServer([{"content": "Score: 2"}] * 50) as srv:
        second = iterate(tmp_path, tiny_model, seed_files, *api, "--judge-api-base", srv.url)
    assert second.exit_code == 0, second.output
    assert len(srv.requests) == n_candidates - 3
    scores = [j["score"] for j in run.rows("select score from judgments where round = 2 order by id")]
    assert sorted(scores).count(4.0) == 3 and len(scores) == n_candidates
    # The kept answers keep their provenance: the server that gave them and the model it reported.
    kept = run.rows("select endpoint, served_model from judgments where round = 2 and score = 4")
    assert kept == [{"endpoint": first_url, "served_model": "judge-v1"}] * 3
