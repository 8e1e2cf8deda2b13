"""Named points where a crash test kills this process with a real SIGKILL.

    SELFREWARD_KILL_AT="r2:judge:generated#3" selfreward iterate ...

kills the process, with no cleanup code run, the 3rd time it reaches the point
`generated` inside round 2's judge stage. Unset (the normal case), a point costs
one dictionary lookup. The chaos test (tests/test_chaos.py, bench/chaos.py)
kills `iterate` at points spread over every stage and checks that a rerun ends
with exactly the rows of an uninterrupted run.

Points: `<stage>:start`, `<stage>:mid-commit` (inside the stage's transaction,
its rows written, not committed), `<stage>:generated` (a prompt's or chunk's
generations kept), `<stage>:step` (a training step done), `<stage>:merge`
(merged weights written, not yet moved into place), `r<t>:finish` (every stage
of round t committed, the round not yet marked finished); `<stage>` is
`r<round>:<name>`, e.g. `r1:sft`.
"""

from __future__ import annotations

import os
import signal
import threading

_where = ""            # the running stage, e.g. "r2:judge"
_hits: dict[str, int] = {}
_lock = threading.Lock()


def enter(stage: str) -> None:
    global _where
    _where = stage


def where() -> str:
    """The running stage (the launched training ranks take it over from the orchestrator)."""
    return _where


def hit(point: str) -> None:
    target = os.environ.get("SELFREWARD_KILL_AT")
    if not target:
        return
    name = point if ":" in point else f"{_where}:{point}"  # "r2:finish" names itself; "step" is the stage's
    with _lock:  # the eval stage generates from several threads
        _hits[name] = _hits.get(name, 0) + 1
        count = _hits[name]
    want, _, nth = target.partition("#")
    if name == want and count == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
