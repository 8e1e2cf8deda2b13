"""Training past one machine: examples/accelerate/multinode.yaml through the config check, the flags
selfreward passes with it through accelerate's own parser and its torchrun settings, `join-training`
as machine 1 of two "machines" on this one host, and the Slurm and Ray examples' own logic.

Nothing here crosses real machines: the two machines are two launchers on 127.0.0.1 (one CPU process
each, gloo), which meet through the same static rendezvous as two nodes would. Losses are compared
as in test_accelerate.py (same effective batch, LOSS_TOL, LoRA dropout off).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from selfreward.backends.engines.vllm import free_port
from selfreward.cli import cli
from selfreward.config import as_dict, check_accelerate_config, resolve
from selfreward.errors import SelfRewardError
from selfreward.training import launch
from selfreward.training.launch import MODULE, accelerate_flags, command, join, pending
from selfreward.training.recipes import sft
from test_accelerate import IFT, LOSS_TOL, RANK_LINE, SIZES, _processes_naming

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "accelerate" / "multinode.yaml"
# Two machines on this host: machine 0's launcher hosts the rendezvous on 127.0.0.1.
LOCAL = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "gpu_ids": "all",
         "machine_rank": 0, "main_process_ip": "127.0.0.1", "mixed_precision": "no", "num_machines": 2,
         "num_processes": 2, "rdzv_backend": "static", "same_network": True, "use_cpu": False}


def _write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def _accelerate_args(cmd: list[str]):
    """What accelerate's launcher makes of a launcher command (`worker launch PID -- <flags>`):
    its parsed and validated arguments, and torchrun's settings, without starting a process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[cmd.index("--") + 1:]))
    prepare_multi_gpu_env(args)
    return args


def test_the_example_loads_and_accelerate_takes_its_machines_from_it():
    from accelerate.commands.config.config_args import load_config_from_file

    check_accelerate_config(str(EXAMPLE))  # the project's check passes it
    loaded = load_config_from_file(str(EXAMPLE))
    assert (loaded.distributed_type.value, loaded.num_machines, loaded.num_processes) == ("MULTI_GPU", 2, 16)
    cfg = resolve({}, {"preset": "tiny", "accelerate_config": str(EXAMPLE)})  # through every config check
    flags = accelerate_flags(cfg, 29555)
    assert "--num_machines" not in flags and "--machine_rank" not in flags
    assert flags == ["--main_process_port", "29555", "--config_file", str(EXAMPLE)]
    launcher = {"machines": launch.machines(cfg), "flags": flags}
    assert launcher["machines"] == 2

    for rank in (0, 1):  # iterate's machine and a joining one: the same flags, their own rank
        args = _accelerate_args(command(launcher, rank, Path("/shared/spec.json")))
        assert args.multi_gpu and args.module and args.training_script == MODULE
        assert args.training_script_args == ["run", "/shared/spec.json"]
        assert (args.num_machines, args.machine_rank, args.num_processes) == (2, rank, 16)
        # torchrun's settings as accelerate computes them: 2 nodes of 8, meeting at machine 0.
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", rank, "8")
        # (accelerate reads same_network from its flag only, so the endpoint goes to torchrun's static rendezvous.)
        assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "node0.cluster.example:29555")


def test_a_port_in_the_config_is_the_port_and_train_processes_counts_all_machines(tmp_path):
    path = _write(tmp_path / "fixed-port.yaml", {**yaml.safe_load(EXAMPLE.read_text()), "main_process_port": 29411})
    cfg = resolve({}, {"preset": "tiny", "accelerate_config": str(path), "train_processes": 4, "dpo_batch_size": 4})
    flags = accelerate_flags(cfg, 29555)
    assert flags == ["--config_file", str(path), "--num_processes", "4"]
    args = _accelerate_args(command({"machines": 2, "flags": flags}, 1, Path("s")))
    assert (args.num_processes, args.nproc_per_node, args.rdzv_endpoint) == (4, "2", "node0.cluster.example:29411")


def test_a_relative_config_path_is_passed_absolute(tmp_path, monkeypatch):
    _write(tmp_path / "local.yaml", LOCAL)
    monkeypatch.chdir(tmp_path)
    cfg = resolve({}, {"preset": "tiny", "accelerate_config": "local.yaml"})
    flags = accelerate_flags(cfg, 29555)
    assert flags[flags.index("--config_file") + 1] == str(tmp_path / "local.yaml")


def test_one_machine_still_gets_num_machines_1():
    cfg = resolve({}, {"preset": "tiny", "train_processes": 2})
    assert accelerate_flags(cfg, 29555)[:4] == ["--num_machines", "1", "--main_process_port", "29555"]
    assert "--machine_rank" not in command({"machines": 1, "flags": []}, 0, Path("s"))


def test_a_multi_machine_config_without_main_process_ip_is_one_line(tmp_path):
    values = {k: v for k, v in yaml.safe_load(EXAMPLE.read_text()).items() if k != "main_process_ip"}
    path = _write(tmp_path / "no-ip.yaml", values)
    with pytest.raises(SelfRewardError) as e:
        check_accelerate_config(str(path))
    assert str(e.value) == (f"accelerate_config {path} has num_machines: 2 but no main_process_ip: set it to the "
                            f"address of the node that runs `selfreward iterate` (docs/training.md)")
    result = CliRunner().invoke(cli, ["iterate", "--runs-dir", str(tmp_path / "runs"), "--name", "x", "--preset",
                                      "tiny", "--set", f"accelerate_config={path}"])
    assert result.exit_code == 1 and result.output == f"Error: {e.value}\n"
    assert not (tmp_path / "runs" / "x").exists()


def _spec(run: Path, model: str, machines: int, id: str, config: Path | None = None) -> Path:
    work = run / "models" / f".{model}.work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(resolve({}, {"preset": "tiny"}), accelerate_config=str(config or EXAMPLE))
    flags = accelerate_flags(cfg, free_port())  # a port no one listens on
    spec = work / "spec.json"
    spec.write_text(json.dumps({"entry": "sft", "out": str(run / "models" / model), "config": as_dict(cfg),
                                "launcher": {"id": id, "machines": machines, "flags": flags}}))
    return spec


def test_pending_is_the_oldest_multi_machine_spec_not_joined_yet(tmp_path):
    run = tmp_path / "runs" / "r"
    assert pending(run, set()) is None  # no run folder yet: iterate has not started
    _spec(run, "M1", 1, "one-machine")
    assert pending(run, set()) is None  # a one-machine training needs no one
    older = _spec(run, "M2", 2, "a")
    newer = _spec(run, "M3", 2, "b")
    os.utime(older, (1, 1))
    (run / "models" / ".M4.work").mkdir()  # a training with no spec yet
    assert pending(run, set())[0] == older
    spec, values = pending(run, {"a"})
    assert spec == newer and values["launcher"]["id"] == "b"
    assert pending(run, {"a", "b"}) is None


def test_a_rank_past_the_machines_is_one_line(tmp_path):
    run = tmp_path / "r"
    _spec(run, "M1", 2, "a")
    with pytest.raises(SelfRewardError, match=r"^--machine-rank 2 but M1's training spans 2 machines "
                                              r"\(ranks 0\.\.1\)$"):
        next(join(run, 2, poll=0.1))


def test_a_replaced_spec_ends_the_stale_launch(tmp_path):
    """A joiner in a spec whose machine 0 is gone (a killed iterate) waits at the rendezvous; a
    rerun's spec for the same stage (a new id) ends that launch, and the joiner moves on."""
    config = _write(tmp_path / "local.yaml", LOCAL)
    run = tmp_path / "r"
    spec = _spec(run, "M2", 2, "stale", config)
    lines = []
    joiner = threading.Thread(target=lambda: lines.append(next(join(run, 1, poll=0.2))), daemon=True)
    joiner.start()
    deadline = time.monotonic() + 60
    while not _processes_naming(str(spec)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_naming(str(spec)), "the stale launch did not start"
    time.sleep(2)
    assert not lines  # still waiting for its machine 0
    _spec(run, "M2", 2, "rerun", config)
    joiner.join(timeout=30)
    log = run / "logs" / "train-M2-machine1.log"
    assert lines == [f"M2: machine 1 of 2: ended: a newer spec replaced it (log: {log})"]
    assert _processes_naming(str(spec)) == []
    assert "--machine_rank 1" in log.read_text()


def test_join_training_is_machine_1_of_two_on_this_host(tmp_path, tiny_model, capsys):
    """iterate's training (machine 0, in this process) and `selfreward join-training` (machine 1, a
    subprocess started first) train together, 1 CPU process each, and log the losses of one process."""
    runs = tmp_path / "runs"
    config = _write(tmp_path / "two-machines.yaml", {**LOCAL, "main_process_port": free_port()})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    output = tmp_path / "joiner.out"
    log1 = runs / "two" / "logs" / "train-M1-machine1.log"
    done = f"M1: machine 1 of 2: done (log: {log1})"
    with open(output, "w") as out:
        joiner = subprocess.Popen([sys.executable, "-m", "selfreward", "join-training", "two", "--runs-dir",
                                   str(runs), "--machine-rank", "1"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        one, _, _ = sft(str(tiny_model), IFT, [], resolve({}, SIZES), tmp_path / "one" / "models" / "M1")
        two, adapter, info = sft(str(tiny_model), IFT, [], resolve({}, {**SIZES, "accelerate_config": str(config)}),
                                 runs / "two" / "models" / "M1")
        deadline = time.monotonic() + 30  # machine 1's ranks may end a little after machine 0's
        while done not in output.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        joiner.terminate()  # as Slurm and the Ray driver end it
        joiner.wait(timeout=30)
    losses_one, losses_two = [r["loss"] for r in one], [r["loss"] for r in two]
    print(f"\n1 process {losses_one}\n2 machines {losses_two}")
    assert [r["step"] for r in two] == [1, 2, 3, 4] and losses_one[-1] != losses_one[0]
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) <= LOSS_TOL

    log0 = (runs / "two" / "logs" / "train-M1.log").read_text().replace("\r", "\n")
    wrote = "; wrote the adapter and rows.json"
    assert RANK_LINE.findall(log0) == [("0", "2", "MULTI_CPU", "4", wrote)]
    assert RANK_LINE.findall(log1.read_text().replace("\r", "\n")) == [("1", "2", "MULTI_CPU", "4", "")]
    assert "--machine_rank 0" in log0 and "--num_machines" not in log0
    assert output.read_text().splitlines() == [done]
    assert ("training M1 on 2 machines: waiting for the others, each running `selfreward join-training "
            f"{runs / 'two'} --machine-rank R` (R from 1 to 1)") in capsys.readouterr().err
    assert info["steps"] == 4 and adapter.parent.name == "M1"


def _fake(bin: Path, name: str, body: str) -> None:
    (bin / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin / name).chmod(0o755)


def test_the_slurm_script_writes_the_config_and_starts_both_sides(tmp_path):
    """Under a fake scontrol and srun (this machine has no Slurm): srun records its options and runs
    its command as task 0 of its step, with `echo` in place of selfreward."""
    bin = tmp_path / "bin"
    bin.mkdir()
    _fake(bin, "scontrol", 'printf "gpu-a17\\ngpu-b03\\n"')
    # It outlives the script's `kill` of the joiners' step: here that step ends at once, not after iterate.
    _fake(bin, "srun", 'trap "" TERM; opts=(); while [[ $1 == --* ]]; do opts+=("$1"); shift; done\n'
                       'echo "srun ${opts[*]} :: $(SLURM_PROCID=0 "$@")" >> "$SRUN_LOG"')
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a17,b03]",
           "SLURM_NNODES": "2", "SELFREWARD": "echo", "SRUN_LOG": str(tmp_path / "srun.log")}
    result = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "multinode.sbatch"), "--name", "big",
                             "--rounds", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr

    config = tmp_path / "runs" / "big-accelerate.yaml"
    check_accelerate_config(str(config))
    values = yaml.safe_load(config.read_text())
    assert (values["main_process_ip"], values["num_machines"], values["num_processes"]) == ("gpu-a17", 2, 16)
    assert {k: v for k, v in values.items() if k not in ("main_process_ip", "num_machines", "num_processes")} == \
        {k: v for k, v in yaml.safe_load(EXAMPLE.read_text()).items()
         if k not in ("main_process_ip", "num_machines", "num_processes")}
    deadline = time.monotonic() + 10
    while len((tmp_path / "srun.log").read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    steps = sorted((tmp_path / "srun.log").read_text().splitlines())
    assert steps == [
        f"srun --nodes=1 --ntasks=1 --relative=0 :: iterate --set accelerate_config={config} --name big --rounds 3",
        "srun --nodes=1 --ntasks=1 --relative=1 :: join-training big --machine-rank 1",
    ]

    no_name = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "multinode.sbatch"), "--rounds", "3"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert no_name.returncode == 2 and no_name.stderr == "give iterate's --name: the other nodes join that run\n"


def test_the_ray_driver_plans_one_command_per_node(tmp_path):
    """The driver's plan from a node list as ray.nodes() gives it (Ray itself does not run here)."""
    loader = importlib.util.spec_from_file_location("ray_multinode", ROOT / "examples" / "ray" / "multinode.py")
    driver = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(driver)

    def node(id, ip, alive=True, gpus=8):
        return {"NodeID": id, "NodeManagerAddress": ip, "Alive": alive, "Resources": {"CPU": 64, "GPU": gpus}}

    nodes = [node("head", "10.0.0.1", gpus=0), node("dead", "10.0.0.2", alive=False), node("n3", "10.0.0.3"),
             node("n4", "10.0.0.4"), node("n5", "10.0.0.5")]
    runs = str(tmp_path / "runs")
    path, config, machines = driver.plan(nodes, 2, 8, runs, ["--name", "big", "--rounds", "3"])
    assert path == f"{runs}/big-accelerate.yaml"
    assert machines == [
        ("n3", ["iterate", "--runs-dir", runs, "--set", f"accelerate_config={path}", "--name", "big", "--rounds", "3"]),
        ("n4", ["join-training", "big", "--runs-dir", runs, "--machine-rank", "1"]),
    ]
    driver.Machine().write(path, config)
    check_accelerate_config(path)
    assert {k: yaml.safe_load(Path(path).read_text())[k] for k in ("main_process_ip", "num_machines",
                                                                   "num_processes")} == \
        {"main_process_ip": "10.0.0.3", "num_machines": 2, "num_processes": 16}
    with pytest.raises(SystemExit, match="4 nodes with 8 GPUs each asked for, 3 alive in the cluster"):
        driver.plan(nodes, 4, 8, runs, ["--name", "big"])
    with pytest.raises(SystemExit, match="give iterate's --name"):
        driver.plan(nodes, 2, 8, runs, ["--rounds", "3"])
