"""Pid files and process groups (selfreward.procs): a stale or forged pid file never ends a process
this project did not start; `python -P -m` subprocesses never import from the current folder; the
GGUF cache is built once when two processes ask for it at once. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfreward import procs
from selfreward.backends.engines.vllm import reap_servers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stranger():
    """A process in a session of its own (as `setsid sleep` makes) that this project did not start."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    time.sleep(0.2)  # started for real, with a start time
    yield proc
    procs.signal_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def alive(proc: subprocess.Popen, grace: float = 1.0) -> bool:
    """Still running after `grace` s (a SIGKILL takes a moment to land)."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return True
    return False


def record(path: Path, pid: int, **changes) -> Path:
    procs.write_record(path, pid)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def test_a_pid_file_with_a_wrong_start_time_ends_nothing(tmp_path, stranger):
    # The file the engine used to write (pid, start time); the pid now names a process group of someone else's.
    (tmp_path / f"vllm-{stranger.pid}.pid").write_text(f"{stranger.pid} 12345\n")
    record(tmp_path / "vllm-1.pid", stranger.pid, started=procs.started(stranger.pid) - 5.0)
    assert reap_servers(tmp_path) == []
    assert alive(stranger)
    assert not list(tmp_path.glob("vllm-*.pid"))  # removed: a later start does not trip over them again


def test_a_pid_file_from_another_boot_ends_nothing(tmp_path, stranger):
    record(tmp_path / "vllm-1.pid", stranger.pid, boot="00000000-another-boot")
    assert reap_servers(tmp_path) == []
    assert alive(stranger) and not list(tmp_path.glob("vllm-*.pid"))


def test_a_pid_file_that_names_our_server_ends_its_group(tmp_path, stranger):
    """The control: the same process, recorded as the engine records its server, is ended."""
    procs.write_record(tmp_path / "vllm-1.pid", stranger.pid)
    assert reap_servers(tmp_path) == [stranger.pid]
    assert not alive(stranger, grace=10)


def test_members_outliving_their_leader_are_ended_only_when_the_record_lists_them(tmp_path):
    def group():
        proc = subprocess.Popen(["sh", "-c", "sleep 120 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        return proc, int(proc.stdout.readline())

    for listed in (False, True):
        leader, child = group()
        time.sleep(0.2)
        procs.write_record(tmp_path / "vllm-1.pid", leader.pid, members=listed)
        os.kill(leader.pid, signal.SIGKILL)  # the leader dies; its child lives on in the group
        leader.wait(timeout=10)
        try:
            assert procs.group_members(leader.pid) == [child]
            assert reap_servers(tmp_path) == ([leader.pid] if listed else [])
            deadline = time.monotonic() + 10
            while procs.started(child) is not None and listed and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (procs.started(child) is None) == listed
        finally:
            procs.signal_group(leader.pid, signal.SIGKILL)


@pytest.mark.parametrize("content", ["0 0\n", "0 1\n", '{"boot": "%s", "pid": 0, "started": 0, "sid": 0}',
                                     '{"boot": "%s", "pid": 1, "started": 0.0, "sid": 1}', "-1 5\n", "garbage"])
def test_a_pid_file_naming_pid_0_or_1_ends_nothing(tmp_path, content):
    """pid 0 is 'my own group' to killpg, pid 1 is init's: the reap runs in a session of its own here,
    so that a wrong kill shows as its exit status instead of ending the test run."""
    (tmp_path / "vllm-1.pid").write_text(content.replace("%s", procs.boot_id()))
    code = textwrap.dedent(f"""
        from pathlib import Path
        from selfreward.backends.engines.vllm import reap_servers
        print(reap_servers(Path({str(tmp_path)!r})))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.returncode, out.stdout, out.stderr[-2000:])
    assert not list(tmp_path.glob("vllm-*.pid"))


def test_python_m_subprocesses_never_import_from_the_current_folder(tmp_path):
    """A folder named `selfreward` (or `vllm`) where the user runs selfreward is not what the
    launchers import: python_module adds -P, and the accelerate ranks get PYTHONSAFEPATH."""
    marker = tmp_path / "imported"
    for fake in ("selfreward", "vllm"):
        (tmp_path / fake).mkdir()
        (tmp_path / fake / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({fake!r})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = procs.python_module("selfreward.training.worker", "nonsense")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "usage: python -m selfreward.training.worker" in out.stderr, out.stderr[-2000:]
    assert not marker.exists()
    # The same check for a child of such a process: the ranks torchrun starts with `python -m`.
    out = subprocess.run([sys.executable, "-m", "selfreward.training.worker", "nonsense"], cwd=tmp_path,
                         env={**env, "PYTHONSAFEPATH": "1"}, capture_output=True, text=True, timeout=120)
    assert "usage:" in out.stderr and not marker.exists()
    from selfreward.training.launch import _env
    from selfreward.config import resolve

    assert _env(resolve(cli={"preset": "tiny"}), tmp_path)["PYTHONSAFEPATH"] == "1"


def test_the_gguf_cache_is_built_once_by_two_processes_at_once(tmp_path):
    """Two processes (two runs starting on the embedded model) convert the same file at once: one
    builds, the other waits and takes its folder; nothing is deleted under the other, nothing half-built
    is left."""
    target = tmp_path / "models" / "m-0123"
    log = tmp_path / "builds.log"
    code = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from selfreward.backends.models import build_once

        def build(folder):
            open({str(log)!r}, "a").write(f"{{os.getpid()}}\\n")
            (folder / "config.json").write_text("{{}}")
            time.sleep(2)  # a conversion takes a while: the other process arrives meanwhile
            (folder / "model.safetensors").write_text("weights")

        print(build_once(Path({str(target)!r}), build))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    both = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in both]
    assert [p.returncode for p in both] == [0, 0], [e[-2000:] for _, e in outs]
    assert [o.strip() for o, _ in outs] == [str(target)] * 2
    assert len(log.read_text().split()) == 1  # built once
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in target.parent.iterdir() if p != target and not p.name.endswith(".lock")] == []


def test_the_socket_folder_is_private_and_short_enough(tmp_path):
    """Sockets go in `sockets` of the run folder, mode 0700 (the dev endpoints behind them take no
    key); a run folder too deep for a socket path (107 bytes) gets a fresh 0700 folder in the temp
    folder, named for the run."""
    import stat
    import tempfile

    from selfreward.backends.engines.vllm import MAX_SOCKET_PATH, socket_dir

    run = tmp_path / "runs" / "exp"
    run.mkdir(parents=True)
    (run / "sockets").mkdir(mode=0o755)  # an older folder, open to all: closed again
    folder = socket_dir(run, ["policy-0", "policy-1"])
    assert folder == run / "sockets" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "exp"
    deep.mkdir(parents=True)
    folder = socket_dir(deep, ["policy"])
    try:
        assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("selfreward-exp-")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert len(os.fsencode(folder / "policy.sock")) <= MAX_SOCKET_PATH
    finally:
        folder.rmdir()
