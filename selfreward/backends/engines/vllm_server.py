"""Runs vLLM's OpenAI server for the vllm engine, and ends it with its parent.

    python -m selfreward.backends.engines.vllm_server PARENT_PID -- <vllm server args>

The engine starts this in a new session, so the server and the engine-core
processes it spawns share one process group. A watchdog thread polls the
parent; when the parent is gone (a kill -9 runs no cleanup code), it kills the
whole group, so no orphan keeps the model's memory.
"""

import os
import runpy
import signal
import sys
import threading
import time


def watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)
        time.sleep(0.5)


def main() -> None:
    parent, sep, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    assert sep == "--", "usage: vllm_server PARENT_PID -- <vllm server args>"
    threading.Thread(target=watch, args=(parent,), daemon=True).start()
    sys.argv = ["vllm.entrypoints.openai.api_server", *args]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
