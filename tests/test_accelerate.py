"""Training under `accelerate launch` on CPU: 2 processes over gloo on the tiny fixture model
(SFT, DPO, and SimPO on a 4-bit base).

The 2-process runs build the very trainer of the 1-process path (recipes.sft / recipes.preference,
called by each rank), so with the same effective batch (processes x micro-batch x
accumulation) they must log the same losses. Tolerance LOSS_TOL: gradients are averaged by a
gloo all-reduce instead of being summed by accumulation in one process, and the logged loss is
the mean of the two ranks' means, so float32 sums may run in another order (on this machine
the losses came out identical). A wrong batch split or data order moves a step's loss by 1e-3
or more at these learning rates, so 1e-4 tells them apart. LoRA dropout is off in the
comparison: each process draws its own dropout masks, which would make the losses agree only
statistically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from selfreward.cli import cli
from selfreward.config import resolve
from selfreward.backends.models import use_bf16
from selfreward.training.recipes import preference, sft
from selfreward.errors import SelfRewardError
from conftest import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
LOSS_TOL = 1e-4
WORDS = ("water", "energy", "plant", "city", "music", "code", "data", "list")
IFT = [{"instruction": f"explain the {w} and why", "response": f"the {w} is good for you"} for w in WORDS]
PAIRS = [{"prompt": f"say {w}", "chosen": f"{w} answer good", "rejected": "bad bad bad"} for w in WORDS]
# Per step 4 sequences: one process 2 x 2 (micro x accumulation), two processes 2 x 2 x 1.
SIZES = {"preset": "tiny", "eft_eval": "", "lora_dropout": 0.0, "micro_batch_size": 2,
         "sft_batch_size": 4, "sft_epochs": 2.0, "sft_learning_rate": 1e-2, "sft_learning_rate_end": 1e-3,
         "dpo_batch_size": 4, "dpo_epochs": 2.0, "dpo_learning_rate": 1e-2, "dpo_learning_rate_end": 1e-3}
# What each rank prints when it has trained: rank, processes, accelerate's distributed type, steps, whether it wrote.
RANK_LINE = re.compile(r"rank (\d+) of (\d+) \((\w+)\): trained (\d+) logged steps"
                       r"(; wrote the adapter and rows\.json)?")


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    """Hidden size 64, for a 4-bit base: bitsandbytes' CPU kernel packs weights in blocks of 64 inputs."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny64") / "model", hidden=64)


def train(kind: str, model: Path, runs: Path, processes: int, eft_eval: str = "", **overrides):
    cfg = resolve({}, {**SIZES, "train_processes": processes, "eft_eval": eft_eval, **overrides})
    if kind == "sft":
        return sft(str(model), IFT, [], cfg, runs / "models" / "M1", round=1)
    return preference(str(model), PAIRS, cfg, runs / "models" / "M2", round=2)


@pytest.mark.parametrize("kind, overrides", [
    ("sft", {}),
    ("dpo", {}),
    ("simpo", {"train_method": "simpo", "load_in_4bit": "yes"}),  # SimPO on a 4-bit base (QLoRA)
])
def test_two_processes_log_the_losses_of_one(tiny_model, tiny64, tmp_path, heldout, kind, overrides):
    model = tiny64 if overrides.get("load_in_4bit") == "yes" else tiny_model
    t0 = time.perf_counter()
    one, _, info_one = train(kind, model, tmp_path / "one", 1, heldout, **overrides)
    t1 = time.perf_counter()
    two, adapter, info_two = train(kind, model, tmp_path / "two", 2, heldout, **overrides)
    t2 = time.perf_counter()
    losses_one, losses_two = [r["loss"] for r in one], [r["loss"] for r in two]
    diff = max(abs(a - b) for a, b in zip(losses_one, losses_two))
    print(f"\n{kind}: 1 process {t1 - t0:.1f} s {losses_one}\n{kind}: 2 processes {t2 - t1:.1f} s {losses_two}\n"
          f"{kind}: max |difference| {diff:.2e}")

    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert losses_one[-1] != losses_one[0]  # the loss moved: the comparison has something to compare
    assert diff <= LOSS_TOL
    assert info_two["steps"] == 4 and math.isclose(info_two["final_loss"], info_one["final_loss"], abs_tol=LOSS_TOL)
    # The merge gap of the launched training (its adapter reloaded on its base here) is the in-process one:
    # LoRA's rounding only, the bf16 base's rounding where training runs in bf16 (auto on CPUs with
    # AMX or AVX-512 BF16), or the 4-bit base's rounding for QLoRA.
    assert info_two["merge_probe_pairs"] == info_one["merge_probe_pairs"] == 2
    assert info_two["four_bit"] == info_one["four_bit"] == (kind == "simpo")
    assert math.isclose(info_two["merge_gap"], info_one["merge_gap"], rel_tol=1e-3, abs_tol=1e-4)
    assert info_two["merge_gap"] < (1e-2 if use_bf16("auto") else 1e-3) or info_two["four_bit"]
    # The adapters the two trainings wrote agree as well.
    a = load_file(tmp_path / "one" / "models" / adapter.parent.name / "adapter" / "adapter_model.safetensors")
    b = load_file(adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # Written once, by rank 0: one adapter in the run, and the log says which rank wrote it.
    run = tmp_path / "two"
    assert list(run.rglob("adapter_model.safetensors")) == [adapter / "adapter_model.safetensors"]
    log = (run / "logs" / f"train-{adapter.parent.name}.log").read_text().replace("\r", "\n")
    ranks = sorted(RANK_LINE.findall(log))
    wrote = "; wrote the adapter and rows.json"
    assert ranks == [("0", "2", "MULTI_CPU", "4", wrote), ("1", "2", "MULTI_CPU", "4", "")]
    assert not list(run.glob("models/.*.work"))  # the scratch folder is gone


def test_iterate_two_rounds_with_two_processes(tmp_path, tiny_model, seed_files, judge_script):
    runs = tmp_path / "runs"
    args = ["iterate", "--runs-dir", str(runs), "--name", "a", "--model", str(tiny_model), "--ift",
            str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "", "--preset", "tiny",
            "--judge", "scripted", "--judge-script", str(judge_script), "--rounds", "2",
            "--set", "train_processes=2"]
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    print(f"\niterate --rounds 2 --preset tiny --set train_processes=2: {time.perf_counter() - t0:.1f} s")
    assert result.exit_code == 0, result.output
    db = sqlite_utils.Database(runs / "a" / "run.db")
    if db["models"].get("M2")["kind"] == "copy":
        pytest.fail("the scripted judge gave round 2 no pairs to train on")
    for t, kind in ((1, "sft"), (2, "dpo")):
        model = db["models"].get(f"M{t}")
        steps = list(db["training_steps"].rows_where("round = ?", [t]))
        assert model["kind"] == f"{kind}-lora" and json.loads(model["detail"])["steps"] == len(steps)
        assert steps and all(s["kind"] == kind and math.isfinite(s["loss"]) for s in steps)
        log = (runs / "a" / "logs" / f"train-M{t}.log").read_text().replace("\r", "\n")
        assert {r[:2] for r in RANK_LINE.findall(log)} == {("0", "2"), ("1", "2")}  # both trained
    verify = CliRunner().invoke(cli, ["verify", "a", "--runs-dir", str(runs)])
    assert verify.exit_code == 0, verify.output


def test_a_worker_that_dies_is_one_line(tmp_path, tiny_model, monkeypatch):
    """Both ranks are killed (SIGKILL) at their first step, by the crash test's kill point."""
    from selfreward import failpoints

    cfg = resolve({}, {**SIZES, "train_processes": 2})
    monkeypatch.setenv("SELFREWARD_KILL_AT", "r1:sft:step")
    failpoints.enter("r1:sft")  # as the stage would
    try:
        with pytest.raises(SelfRewardError) as e:
            sft(str(tiny_model), IFT, [], cfg, tmp_path / "runs" / "d" / "models" / "M1")
    finally:
        failpoints.enter("")
    message = str(e.value)
    assert "\n" not in message
    assert re.match(r"training under accelerate launch failed \(exit 1\): rank [01] exited with -9 "
                    r"\(pid: \d+\) \(SIGKILL\) \(log: .*/runs/d/logs/train-M1\.log\)$", message), message
    assert not (tmp_path / "runs" / "d" / "models" / "M1").exists()


def test_a_worker_error_is_one_line(tmp_path, tiny_model):
    cfg = resolve({}, {**SIZES, "train_processes": 2})
    missing = tmp_path / "no-such-model"
    with pytest.raises(SelfRewardError) as e:
        sft(str(missing), IFT, [], cfg, tmp_path / "runs" / "e" / "models" / "M1")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("training under accelerate launch failed (exit 1): rank 0: SelfRewardError: "
                              f"cannot load model '{missing}'")
    assert message.endswith(f"(log: {tmp_path / 'runs' / 'e' / 'logs' / 'train-M1.log'})")


def test_a_launcher_error_is_one_line(tmp_path, tiny_model):
    """accelerate's launcher itself refuses the config (before any rank starts): its error, from this launch's output."""
    config = tmp_path / "two-gpus.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\ngpu_ids: '0'\n"
                      "num_machines: 1\nnum_processes: 2\nmixed_precision: 'no'\n")
    cfg = resolve({}, {**SIZES, "accelerate_config": str(config)})
    log = tmp_path / "runs" / "g" / "logs" / "train-M1.log"
    log.parent.mkdir(parents=True)
    log.write_text("Root Cause (first observed failure):\n  rank : 1\n  exitcode : -9\n")  # an earlier launch's
    with pytest.raises(SelfRewardError) as e:
        sft(str(tiny_model), IFT, [], cfg, tmp_path / "runs" / "g" / "models" / "M1")
    assert str(e.value) == ("training under accelerate launch failed (exit 1): ValueError: Less than two GPU ids were "
                            "configured and tried to run on multiple GPUs. Please ensure at least two are specified "
                            f"for `--gpu_ids`, or use `--gpu_ids='all'`. (log: {log})")


def _processes_naming(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_kill_9_of_the_orchestrator_ends_every_worker(tmp_path, tiny_model):
    out = tmp_path / "runs" / "k" / "models" / "M1"
    script = (f"from selfreward.config import resolve\nfrom selfreward.training.recipes import sft\n"
              f"sft({str(tiny_model)!r}, {IFT!r}, [], resolve({{}}, {{**{SIZES!r}, 'train_processes': 2}}), "
              f"__import__('pathlib').Path({str(out)!r}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    orchestrator = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    spec = str(out.with_name(".M1.work") / "spec.json")
    try:
        deadline = time.monotonic() + 60
        workers = []
        while len(workers) < 3 and time.monotonic() < deadline:  # the launcher and both ranks
            time.sleep(0.2)
            workers = _processes_naming(spec)
        assert len(workers) >= 3, f"the workers did not start: {workers}"
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait()
        deadline = time.monotonic() + 20
        while _processes_naming(spec) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_naming(spec) == []
    finally:
        orchestrator.kill()
        for pid in _processes_naming(spec):  # only if the test failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("name, distributed, extra", [
    ("zero2", "DEEPSPEED", {"zero_stage": 2}),
    ("zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_save_16bit_model": True}),
    ("fsdp", "FSDP", {"fsdp_state_dict_type": "FULL_STATE_DICT"}),
])
def test_example_accelerate_configs_parse_and_pass_through(name, distributed, extra):
    """Each example loads with accelerate's own config loader, and accelerate's launcher accepts
    the flags selfreward passes with it (train_processes overriding the file's num_processes)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from selfreward.training.launch import MODULE, accelerate_flags

    path = ROOT / "examples" / "accelerate" / f"{name}.yaml"
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.value == distributed
    assert extra.items() <= {**loaded.deepspeed_config, **loaded.fsdp_config}.items()
    # Not through resolve: DeepSpeed is not installed here, which the config check refuses.
    cfg = dataclasses.replace(resolve({}, {"preset": "tiny", "train_processes": 2}), accelerate_config=str(path))
    flags = accelerate_flags(cfg, 29555)
    assert flags[flags.index("--config_file") + 1] == str(path)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*flags, "-m", MODULE, "run", "s"]))
    assert args.num_processes == 2 and args.module and args.training_script == MODULE
    assert (args.use_deepspeed, args.use_fsdp) == (distributed == "DEEPSPEED", distributed == "FSDP")


@pytest.mark.parametrize("flags, message", [
    (["--train-processes", "2", "--train-method", "grpo"], "train_method 'grpo' trains in one process"),
    (["--train-processes", "3"], "sft_batch_size=4 must be a multiple of train_processes=3"),
    (["--set", "accelerate_config=nowhere.yaml"], "accelerate_config file not found"),
    (["--set", f"accelerate_config={ROOT / 'examples' / 'accelerate' / 'zero2.yaml'}"],
     "asks for DeepSpeed, which is not installed: pip install deepspeed"),
    (["--set", f"accelerate_config={ROOT / 'README.md'}"], "README.md is not valid YAML"),
    (["--train-processes", "0"], "Invalid value for '--train-processes'"),
])
def test_bad_process_settings_fail_with_one_line(tmp_path, flags, message):
    result = CliRunner().invoke(cli, ["iterate", "--runs-dir", str(tmp_path), "--name", "bad", "--preset", "tiny",
                                      *flags])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()
