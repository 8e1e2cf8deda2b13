"""Process groups this project starts (vLLM servers, accelerate launchers), and the records that let a
later process end a group an earlier one left behind without ever ending someone else's.

A pid alone names nothing: pids are reused, after a reboot, in a run folder copied elsewhere, or
on another node of a shared filesystem. A record therefore holds the boot id, the pid, its start
time and its session id, and after start-up each member of the group with its start time. A
group is ended only when its leader is provably the recorded process, or when every member left
is provably one the record lists; anything else leaves the processes alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil


def python_module(module: str, *args: str) -> list[str]:
    """`python -P -m module args`: -P keeps the user's current folder off sys.path, so that a folder
    named `selfreward` or `vllm` there is never imported in place of the real package."""
    return [sys.executable, "-P", "-m", module, *args]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"btime:{psutil.boot_time():.0f}"


def started(pid: int) -> float | None:
    """Seconds from boot to the process's start (fixed for its life, unlike the wall-clock form); None if gone."""
    try:
        # Both terms read the same boot time, so the difference is the kernel's own start tick.
        return round(psutil.Process(pid).create_time() - psutil.boot_time(), 2)
    except (psutil.Error, ValueError):
        return None


def session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                members.append(pid)
        except OSError:
            continue
    return members


def session_members(sid: int) -> list[int]:
    """Every live process of a session (a Ray head's workers each lead a group of their own, but stay
    in it); not zombies, which hold nothing and wait only for their parent to read them."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):
            continue
    return members


def kill_session(sid: int, wait: float = 10.0) -> None:
    """SIGKILL every process of a session other than ours (and never pid 0 or 1), again for any it
    started meanwhile, until none is left or `wait` seconds have passed."""
    import time

    if sid <= 1 or sid == os.getsid(0):
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        alive = session_members(sid)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.1)


def signal_group(pgid: int, sig: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():
        return  # never the whole system, never ourselves
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """End the process group that `proc` leads: SIGTERM (when it still runs), up to `grace` s for it
    to wind down, then SIGKILL for any straggler of the group, and reap `proc`."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def write_record(path: Path, pid: int, members: bool = False, whole_session: bool = False) -> None:
    """Record the group `pid` leads (a new session's leader); members: also list each process now in it;
    whole_session: ending it also ends every process of its session."""
    record = {"boot": boot_id(), "pid": pid, "started": started(pid), "sid": session(pid)}
    if whole_session:
        record["session"] = True
    if members:
        record["members"] = [[m, started(m)] for m in group_members(pid)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)  # never half a record


def reap_record(path: Path) -> int | None:
    """SIGKILL the group a record names when it is provably the one recorded; remove the record
    either way. Returns the group id ended, or None."""
    ended = None
    try:
        record = json.loads(path.read_text())
        pid, sid, boot = int(record["pid"]), int(record["sid"]), str(record["boot"])
        at = float(record["started"])
        members = {int(m): float(s) for m, s in record.get("members") or [] if s is not None}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        record = None  # unreadable, or the old form without boot and session: nothing it says is proof
    if record is not None and boot == boot_id() and pid > 1 and sid == pid and pid != os.getpgrp():
        if _is(pid, at, sid) and _leads(pid):
            ended = pid
        else:
            # The leader is gone (or is someone else now): only processes the record lists, each in its
            # session and with its start time, may be left in the group, else it is not ours.
            left = group_members(pid)
            if left and all(members.get(m) is not None and _is(m, members[m], sid) for m in left):
                ended = pid
        if ended:
            signal_group(pid, signal.SIGKILL)
            if record.get("session"):
                # The rest of the session (a Ray head's workers) was started by the group just proven ours.
                kill_session(pid)
    path.unlink(missing_ok=True)
    return ended


def _is(pid: int, at: float, sid: int) -> bool:
    return started(pid) == at and session(pid) == sid


def _leads(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False

