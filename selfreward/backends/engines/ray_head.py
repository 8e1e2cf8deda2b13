"""Runs a local Ray head (`ray start --head --block`) for the ray engine, and ends it with its parent.

    python -m selfreward.backends.engines.ray_head PARENT_PID -- <ray start args>

The engine starts this in a new session. Ray's own processes (GCS, raylet, agents) join this
process's group, and its workers, which each lead a group of their own, stay in the session.
A watchdog thread polls the parent; when the parent is gone (a kill -9 runs no cleanup code),
it kills every process of the session, so no orphan keeps a model's memory. `ray start` cannot
do this itself: after a driver dies, its dashboard and runtime-env agents ignore SIGTERM.
"""

import os
import runpy
import signal
import sys
import threading
import time


def end_session() -> None:
    """SIGKILL every other process of this session, then this one."""
    me, sid = os.getpid(), os.getsid(0)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.getsid(int(name)) == sid:
                os.kill(int(name), signal.SIGKILL)
        except OSError:
            continue
    os.kill(me, signal.SIGKILL)


def watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            end_session()
        time.sleep(0.5)


def main() -> None:
    parent, sep, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    assert sep == "--", "usage: ray_head PARENT_PID -- <ray start args>"
    threading.Thread(target=watch, args=(parent,), daemon=True).start()
    sys.argv = ["ray", "start", *args]
    runpy.run_module("ray.scripts.scripts", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
