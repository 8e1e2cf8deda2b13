"""SFT, DPO and SimPO under `accelerate launch` (train_processes > 1, or an accelerate_config):
the orchestrator's side.

fit.train writes a spec into the stage's scratch folder and starts, in a new session,

    python -m selfreward.training.worker launch PARENT_PID -- <accelerate launch flags> \\
        -m selfreward.training.worker run SPEC

(selfreward.training.worker is the launched side.) Rank 0 writes the adapter and the logged
rows into the scratch folder; this side reads them, and fit merges and commits them. No
worker opens run.db.

Past one machine (an accelerate_config with num_machines > 1) this process is machine 0, and
the run folder is on a filesystem every machine sees. The spec also holds the launcher's flags;
`join` (`selfreward join-training`) runs on each other machine, waits for each training's spec
and starts the same launcher with its own --machine_rank. One command per machine for the
whole run, rather than one per stage: the stages come and go inside `iterate`, and only the
spec, on the shared folder, says when the next one is ready.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

from selfreward.errors import SelfRewardError


MODULE = "selfreward.training.worker"


def machines(cfg) -> int:
    """How many machines train together: the accelerate_config's num_machines, else 1."""
    from selfreward.config import accelerate_settings

    return int(accelerate_settings(cfg.accelerate_config).get("num_machines") or 1) if cfg.accelerate_config else 1


def accelerate_flags(cfg, port: int) -> list[str]:
    """`accelerate launch` flags, the same on every machine (the machine rank comes on top). With an
    accelerate_config, accelerate decides everything that file says (distribution, precision,
    machines, processes unless train_processes > 1 overrides them). Without one: N processes by
    torchrun's launcher (accelerate's --multi_gpu), which on a CUDA box is one per GPU with NCCL;
    on CPU, where TrainingArguments says use_cpu, accelerate makes it MULTI_CPU over gloo (its --cpu
    flag would start a single process unless mpirun is set up)."""
    import torch

    from selfreward.config import accelerate_settings

    settings = accelerate_settings(cfg.accelerate_config) if cfg.accelerate_config else {}
    count = int(settings.get("num_machines") or 1)
    if count == 1:
        flags = ["--num_machines", "1", "--main_process_port", str(port)]
    else:
        # The machines meet at the file's main_process_ip and main_process_port; where it sets no
        # port, at one free on machine 0 (this one), which the others read from the spec.
        flags = [] if settings.get("main_process_port") else ["--main_process_port", str(port)]
    if cfg.accelerate_config:
        # Absolute: the other machines' launchers start in a folder of their own.
        flags += ["--config_file", os.path.abspath(cfg.accelerate_config)]
    else:
        # Precision is TrainingArguments' (train_precision); no torch.compile.
        flags += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if cfg.train_processes > 1:
        # accelerate's num_processes counts the processes of every machine.
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and cfg.train_processes > gpus * count:
            raise SelfRewardError(f"train_processes={cfg.train_processes} but {count} machine(s) with {gpus} GPU(s) "
                                  f"each: one process per GPU")
        flags += ["--num_processes", str(cfg.train_processes)]
    return flags


def command(launcher: dict, machine_rank: int, spec: Path) -> list[str]:
    """The command that starts the launcher on one machine, watched by this process: `launcher` is
    the spec's record of the flags and the machine count."""
    from selfreward import procs

    rank = ["--machine_rank", str(machine_rank)] if launcher["machines"] > 1 else []
    return procs.python_module(MODULE, "launch", str(os.getpid()), "--", *launcher["flags"], *rank,
                               "-m", MODULE, "run", str(spec))


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
    # `launcher`: what another machine's `join` needs to start its part; `id` tells a rerun's spec from this one.
    launcher = {"id": uuid.uuid4().hex, "machines": machines(cfg), "flags": accelerate_flags(cfg, free_port())}
    # `stage`: the crash test's kill points named `<stage>:step` fire in the ranks, where the steps are.
    text = json.dumps({"entry": name, "out": str(out), "config": as_dict(cfg), "stage": failpoints.where(),
                       "launcher": launcher, "args": {"base_path": base_path, "round": round, **data}})
    # Written whole, then renamed: another machine may read it as soon as it exists.
    (work / "spec.tmp").write_text(text)
    os.replace(work / "spec.tmp", spec)
    log_path = out.parent.parent / "logs" / f"train-{out.name}.log"
    if launcher["machines"] > 1:
        print(f"training {out.name} on {launcher['machines']} machines: waiting for the others, each running "
              f"`selfreward join-training {out.parent.parent} --machine-rank R` (R from 1 to "
              f"{launcher['machines'] - 1})", file=sys.stderr, flush=True)
    proc, start = _start(command(launcher, 0, spec), log_path, _env(cfg, work))
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


def _start(cmd: list[str], log_path: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """Start a launcher with its output appended to log_path: (the process, where its output begins)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        start = log.tell()  # the log keeps earlier launches; an error is looked for in this one's output
        # A new session: the launcher and its agent form one process group to end together.
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), start


def join(run: Path, machine_rank: int, poll: float = 2.0):
    """Machine `machine_rank` in every multi-machine training of the run at `run`, one after another,
    until interrupted: wait for a spec whose launcher spans more machines than this rank, start the
    same launcher with this machine's rank, wait for it, and yield one line on how it ended. A spec
    replaced while its launch runs (machine 0's `iterate` died and a rerun wrote the stage anew)
    ends that launch: its machine 0 is gone, and the rerun's spec is joined instead."""
    from selfreward import procs
    from selfreward.config import Config

    joined = set()
    while True:
        found = pending(run, joined)
        if found is None:
            time.sleep(poll)
            continue
        spec, values = found
        launcher, model = values["launcher"], Path(values["out"]).name
        joined.add(launcher["id"])
        if machine_rank >= launcher["machines"]:
            raise SelfRewardError(f"--machine-rank {machine_rank} but {model}'s training spans "
                                  f"{launcher['machines']} machines (ranks 0..{launcher['machines'] - 1})")
        log_path = run / "logs" / f"train-{model}-machine{machine_rank}.log"
        cfg = Config(**values["config"])
        proc, _ = _start(command(launcher, machine_rank, spec), log_path, _env(cfg, spec.parent))
        replaced = False
        try:
            # The spec goes when machine 0 has its adapter; this launch still ends on its own.
            while proc.poll() is None and not replaced:
                time.sleep(poll)
                replaced = _spec_id(spec) not in (None, launcher["id"])
        finally:
            procs.end_group(proc)
        how = "ended: a newer spec replaced it" if replaced else \
            "done" if proc.returncode == 0 else f"exit {proc.returncode}"
        yield f"{model}: machine {machine_rank} of {launcher['machines']}: {how} (log: {log_path})"


def pending(run: Path, joined: set[str]) -> tuple[Path, dict] | None:
    """The oldest spec in the run that spans several machines and was not joined yet: (path, contents)."""
    found = []
    for spec in run.glob("models/.*.work/spec.json"):
        try:
            values, mtime = json.loads(spec.read_text()), spec.stat().st_mtime
        except (OSError, ValueError):
            continue  # gone meanwhile: the training ended
        launcher = values.get("launcher", {})  # none in a spec an earlier version left behind
        if launcher.get("machines", 1) > 1 and launcher["id"] not in joined:
            found.append((mtime, spec, values))
    return min(found, key=lambda f: f[0])[1:] if found else None


def _spec_id(spec: Path) -> str | None:
    try:
        return json.loads(spec.read_text())["launcher"]["id"]
    except (OSError, ValueError, KeyError):
        return None


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
