"""The API judge through a misbehaving proxy: a real HTTP server on 127.0.0.1 behind
a real proxy, also on 127.0.0.1, that answers 30% of requests with a 5xx, lets 10%
time out, returns garbage for 5% (not JSON, no choices, empty content) and drops
5% of connections. The loop completes, every judgment is a score or NULL with the
reason, and the stored retry counts add up to the requests the proxy saw."""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from click.testing import CliRunner
from test_api_judge import ScriptedServer

from selfreward.cli import cli
from selfreward.core.store import Run


class FaultProxy(ScriptedServer):
    """Forwards POSTs to `upstream`, misbehaving on a seeded schedule. Counts what it did.
    (Started and stopped like the ScriptedServer it stands in front of.)"""

    def __init__(self, upstream: str, seed: int = 7, timeout_s: float = 1.0):
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.counts = {"forwarded": 0, "5xx": 0, "timeout": 0, "garbage": 0, "reset": 0, "requests": 0}
        host, port = upstream.split("//")[1].split("/")[0].split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # the engine's reachability check (GET /v1/models)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.counts["requests"] += 1
                    roll = proxy.rng.random()
                if roll < 0.30:
                    proxy.count("5xx")
                    return self.reply(proxy.rng.choice([500, 502, 503, 504]), b'{"error": {"message": "injected"}}')
                if roll < 0.40:
                    proxy.count("timeout")
                    time.sleep(timeout_s)  # past the client's timeout; the client has hung up
                    return self.reply(200, b"{}")
                if roll < 0.45:
                    proxy.count("garbage")
                    return self.reply(200, proxy.rng.choice([b"<html>oops</html>", b'{"id": "x", "choices": []}']))
                if roll < 0.50:
                    proxy.count("reset")
                    self.close_connection = True
                    return  # no status line: the connection just drops
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request("POST", self.path, body, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                payload = answer.read()
                conn.close()
                proxy.count("forwarded")
                self.reply(answer.status, payload)

            def reply(self, status: int, payload: bytes):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1


def test_the_loop_survives_a_faulty_api_and_accounts_for_every_judgment(tmp_path, tiny_model, seed_files):
    # Empty content is the judge's own (empty) answer: NULL with "empty output", never a score.
    script = [{"content": "" if k % 9 == 4 else f"Judged.\nScore: {k % 6}"} for k in range(400)]
    with ScriptedServer(script) as upstream, FaultProxy(upstream.url) as proxy:
        args = ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "f", "--model", str(tiny_model),
                "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(seed_files["eft"]),
                "--preset", "tiny", "--rounds", "2", "--judge", "api", "--api-base", proxy.url, "--api-model", "j",
                "--set", "api_timeout=0.3", "--set", "api_max_retries=8", "--set", "api_backoff=0.01",
                "--set", "api_concurrency=4", "--set", "prompts_per_round=4", "--set", "n_candidates=3",
                "--set", "judge_samples=3"]
        result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    counts = proxy.counts
    assert min(counts["5xx"], counts["timeout"], counts["garbage"], counts["reset"]) > 0, counts
    with Run.open(tmp_path / "runs" / "f") as run:
        judgments = run.rows("select score, reason, retries from judgments")
        evals = run.db["eft_eval"].count
    assert judgments and all((j["score"] is None) == (j["reason"] is not None) for j in judgments)
    assert any(j["reason"] == "empty output" for j in judgments)
    # Every request the proxy saw is a judgment's final try or one of its stored retries
    # (the eval stages' judgments are counted in eft_eval, which keeps no retry column).
    retries = sum(j["retries"] or 0 for j in judgments)
    assert retries > 0
    assert counts["requests"] >= len(judgments) + retries + evals
    print(f"\nfault mix: {counts}; {len(judgments)} judgments, {retries} retries stored")
