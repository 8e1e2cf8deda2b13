"""`selfreward browse`: Datasette on 127.0.0.1, a canned-query page rendered by headless Chromium."""

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from selfreward.inspection.browse import QUERIES, command, write_metadata

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def datasette(judged_run, tmp_path):
    pytest.importorskip("datasette", reason="the browse extra is not installed: pip install -e '.[browse]'")
    port = free_port()
    proc = subprocess.Popen(command(judged_run, "127.0.0.1", port, write_metadata(tmp_path)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # bounded: at most ~20 s for the server to come up
            try:
                urllib.request.urlopen(base + "/-/versions.json", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"datasette exited: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        else:
            pytest.fail("datasette did not start within 20 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_canned_query_renders_rationales_in_chromium(datasette, judged_run, tmp_path):
    url = f"{datasette}/run/pairs_with_rationales"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90).stdout
    assert QUERIES["pairs_with_rationales"]["title"] in dom
    assert 'class="rows-and-columns"' in dom
    kept = judged_run.rows("select count(*) n from pairs where status = 'kept'")[0]["n"]
    rationale = judged_run.rows("select rationale from judgments where score is not null and rationale != '' "
                                "limit 1")[0]["rationale"]
    if kept:
        assert rationale in dom  # rationale text is shown whole, not truncated
    # The table descriptions from the metadata reach the page too.
    table_dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--user-data-dir={tmp_path / 'chrome2'}", "--dump-dom", f"{datasette}/run/judgments"],
        capture_output=True, text=True, timeout=90).stdout
    assert "Append-only" in table_dom and "never 0 in its place" in table_dom


def test_every_canned_query_runs(datasette):
    import json

    for name in QUERIES:
        url = f"{datasette}/run/{name}.json?_shape=array&min_spread=0"
        rows = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert isinstance(rows, list), name


def test_browse_reads_with_normal_locking_and_writes_nothing(judged_run, tmp_path):
    """Immutable mode (-i) skips SQLite's locks and can show a half-written stage; browse must not use it,
    and opening a run to browse it must not migrate or otherwise write the file."""
    import hashlib

    from selfreward.core.store import Run

    db_file = judged_run.path / "run.db"
    judged_run.close()
    before = hashlib.sha256(db_file.read_bytes()).hexdigest(), db_file.stat().st_mtime_ns
    with Run.open(judged_run.path) as run:
        cmd = command(run, "127.0.0.1", free_port(), write_metadata(tmp_path))
    assert "-i" not in cmd and "--immutable" not in cmd and str(db_file) in cmd
    assert (hashlib.sha256(db_file.read_bytes()).hexdigest(), db_file.stat().st_mtime_ns) == before


def test_rows_committed_while_browsing_show_up(datasette, judged_run):
    """With normal locking Datasette sees each commit as it lands (immutable mode would not)."""
    import json as _json

    url = datasette + "/run/prompts.json?_shape=array&_size=max"
    before = len(_json.loads(urllib.request.urlopen(url, timeout=5).read()))
    import sqlite3

    with sqlite3.connect(judged_run.path / "run.db") as db:  # a writer's commit (the reader cannot write)
        db.execute("insert into prompts (round, text, source, created_at) values (9, 'x', 't', 'now')")
    after = len(_json.loads(urllib.request.urlopen(url, timeout=5).read()))
    assert after == before + 1


def test_browse_refuses_a_public_host_unless_asked(tmp_path):
    from click.testing import CliRunner
    from fixture_run import build_fixture_run

    from selfreward.cli import cli
    from selfreward.inspection.browse import loopback

    run = build_fixture_run(tmp_path / "runs" / "b")
    run.close()
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        result = CliRunner().invoke(cli, ["browse", str(run.path), "--host", host, "--port", "1"])
        assert result.exit_code == 1 and "--public" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert all(loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))


def test_browse_on_a_public_host_warns_and_serves(tmp_path):
    """With --public, browse says in words that anyone who reaches the port reads the run, then serves it."""
    import sys

    from fixture_run import build_fixture_run

    pytest.importorskip("datasette", reason="the browse extra is not installed: pip install -e '.[browse]'")
    run = build_fixture_run(tmp_path / "runs" / "b")
    run.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-P", "-m", "selfreward", "browse", str(run.path), "--host", "0.0.0.0",
                             "--port", str(port), "--public"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        warning = proc.stdout.readline()
        assert warning.startswith(f"warning: serving {run.path} on 0.0.0.0:{port} with no login"), warning
        for _ in range(100):  # bounded: at most ~20 s for the server to come up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/versions.json", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "browse exited"
                time.sleep(0.2)
        else:
            pytest.fail("browse --public did not serve within 20 s")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # Datasette ended with browse: it does not go on serving the run alone (it did, before).
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/-/versions.json", timeout=1)


def test_every_table_of_a_run_is_documented_for_browse(tmp_path):
    from selfreward.config import resolve
    from selfreward.core.store import Run
    from selfreward.inspection.browse import TABLES

    with Run.create(tmp_path / "r", resolve({}, {"preset": "tiny"})) as run:
        tables = [n for n in run.db.table_names() if not n.startswith("_") and "_fts" not in n]
    # the scratch table of a running stage is emptied at every commit: nothing there to browse
    assert sorted(set(tables) - set(TABLES)) == ["generation_checkpoint"]
