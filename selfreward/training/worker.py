"""The launched side of `accelerate launch` (selfreward.training.launch starts it).

`launch` runs accelerate's launcher in this process under the vLLM launcher's watchdog
(vllm_server.watch): when the orchestrator dies, even by kill -9, the launcher's process group
dies with it. torchrun starts each rank in a session of its own, so every rank runs the same
watchdog on its launcher. `run` is one rank: it calls the recipe the spec names (sft or
preference) with the spec's data, so it builds the same trainer as one process would, and
trains it (fit.train_launched): rank 0 writes the adapter and the logged rows into the spec's
folder, the stage's scratch folder.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from selfreward.training.launch import MODULE


def _launch(parent: int, flags: list[str]) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    from selfreward.backends.engines.vllm_server import watch

    threading.Thread(target=watch, args=(parent,), daemon=True).start()
    launch_command(launch_command_parser().parse_args(flags))


def _run(spec_path: str) -> None:
    """One rank: build and train the trainer that the spec names."""
    from selfreward.backends.engines.vllm_server import watch

    threading.Thread(target=watch, args=(os.getppid(),), daemon=True).start()
    import torch

    if torch.cuda.is_available():  # 'cuda' in load_model means this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from selfreward.config import Config
    from selfreward import failpoints
    from selfreward.training import recipes
    from selfreward.training.fit import train_launched

    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec_path).parent  # the stage's scratch folder
    failpoints.enter(spec["stage"])
    cfg, out, args = Config(**spec["config"]), Path(spec["out"]), spec["args"]
    base_path, round = args["base_path"], args["round"]
    try:
        if spec["entry"] == "sft":
            kind, build = "sft", recipes.sft_trainer(base_path, args["ift"], args["eft"], cfg, out, round)
        elif spec["entry"] == "preference":
            kind, build = cfg.train_method, recipes.preference_trainer(base_path, args["pairs"], cfg, out, round)
        else:
            raise ValueError(f"no recipe {spec['entry']!r} runs under accelerate launch")
        train_launched(kind, cfg, base_path, round, build, work)
    except Exception as e:
        # One line for the orchestrator's error; the traceback goes to the log as usual.
        rank = os.environ.get("RANK", "0")
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        (work / f"error-rank{rank}.txt").write_text(f"rank {rank}: {type(e).__name__}: {line}"[:500] + "\n")
        raise


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "launch":
        parent, sep, flags = int(args[0]), args[1], args[2:]
        assert sep == "--", "usage: worker launch PARENT_PID -- <accelerate launch flags and script>"
        _launch(parent, flags)
    elif command == "run":
        _run(args[0])
    else:
        raise SystemExit(f"usage: python -m {MODULE} launch PARENT_PID -- ... | run SPEC")


if __name__ == "__main__":
    main()
