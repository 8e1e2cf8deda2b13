"""SFT, DPO and SimPO under `accelerate launch` (train_processes > 1, or an accelerate_config):
the orchestrator's side.

fit.train writes a spec into the stage's scratch folder and starts, in a new session,

    python -m selfreward.training.worker launch PARENT_PID -- <accelerate launch flags> \\
        -m selfreward.training.worker run SPEC

(selfreward.training.worker is the launched side.) Rank 0 writes the adapter and the logged
rows into the scratch folder; this side reads them, and fit merges and commits them. No
worker opens run.db.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from selfreward.errors import SelfRewardError


MODULE = "selfreward.training.worker"


def accelerate_flags(cfg, port: int) -> list[str]:
    """`accelerate launch` flags. With an accelerate_config, accelerate decides everything that
    file says (distribution, precision, processes unless train_processes > 1 overrides them).
    Without one: N processes by torchrun's launcher (accelerate's --multi_gpu), which on a CUDA
    box is one per GPU with NCCL; on CPU, where TrainingArguments says use_cpu, accelerate makes
    it MULTI_CPU over gloo (its --cpu flag would start a single process unless mpirun is set up)."""
    import torch

    flags = ["--num_machines", "1", "--main_process_port", str(port)]
    if cfg.accelerate_config:
        flags += ["--config_file", cfg.accelerate_config]
    else:
        # Precision is TrainingArguments' (train_precision); no torch.compile.
        flags += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if cfg.train_processes > 1:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and cfg.train_processes > gpus:
            raise SelfRewardError(f"train_processes={cfg.train_processes} but this machine has {gpus} GPU(s): "
                                  f"one process per GPU")
        flags += ["--num_processes", str(cfg.train_processes)]
    return flags


def launch(cfg, work: Path, base_path: str, out: Path, round: int,
           entry: tuple[str, dict] | None) -> tuple[list[dict], Path]:
    """Train under `accelerate launch` and wait for it: (logged rows, adapter folder), both
    written by rank 0 into `work`. A launch that fails is one line with the workers' most telling
    error line; the whole output is in runs/<name>/logs/train-<model>.log."""
    from selfreward import procs
    from selfreward.backends.engines.vllm import free_port
    from selfreward.config import as_dict
    from selfreward import failpoints

    if entry is None:
        raise SelfRewardError("this training runs in one process only: set train_processes=1 and no "
                              "accelerate_config")
    name, data = entry
    spec = work / "spec.json"
    # `stage`: the crash test's kill points named `<stage>:step` fire in the ranks, where the steps are.
    spec.write_text(json.dumps({"entry": name, "out": str(out), "config": as_dict(cfg), "stage": failpoints.where(),
                                "args": {"base_path": base_path, "round": round, **data}}))
    cmd = procs.python_module(MODULE, "launch", str(os.getpid()), "--", *accelerate_flags(cfg, free_port()),
                              "-m", MODULE, "run", str(spec))
    log_path = out.parent.parent / "logs" / f"train-{out.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        start = log.tell()  # the log keeps earlier launches; an error is looked for in this one's output
        # A new session: the launcher and its agent form one process group to end together.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(cfg, work),
                                start_new_session=True)
    try:
        code = proc.wait()
    finally:
        procs.end_group(proc)  # interrupted here: torchrun's agent ends its ranks on SIGTERM
    rows, adapter = work / "rows.json", work / "adapter"
    if code != 0 or not rows.is_file() or not (adapter / "adapter_config.json").is_file():
        why = f"exit {code}" if code != 0 else "no adapter or rows.json from rank 0"
        output = log_path.read_bytes()[start:].decode(errors="replace")
        raise SelfRewardError(f"training under accelerate launch failed ({why}): {worker_error(work, output)} "
                              f"(log: {log_path})")
    return json.loads(rows.read_text()), adapter


def _env(cfg, work: Path) -> dict:
    import torch

    # PYTHONSAFEPATH: the ranks, which torchrun starts with `python -m`, import nothing from the current folder.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        # torchrun would give each rank 1 thread; the cores are shared among the ranks instead.
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // cfg.train_processes))
    return env


def worker_error(work: Path, output: str) -> str:
    """The first rank's own error (written by `run`); else, for a rank that died without one (a
    signal, the OOM killer), the root cause torchrun reports; else the output's last error line."""
    errors = sorted(work.glob("error-rank*.txt"))
    if errors:
        return errors[0].read_text().strip()
    _, found, cause = output.rpartition("Root Cause (first observed failure):")
    fields = dict(re.findall(r"^\s*(rank|exitcode)\s*:\s*(.+?)\s*$", cause, re.M)) if found else {}
    if {"rank", "exitcode"} <= fields.keys():
        return f"rank {fields['rank'].split()[0]} exited with {' '.join(fields['exitcode'].split())}"
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")[-300:]
