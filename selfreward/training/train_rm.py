"""`selfreward train-rm`: a Bradley-Terry reward model trained from a run, usable at once
as the `reward-model` judge.

The policy's body (the newest M_t by default) gets a fresh one-logit score head
(AutoModelForSequenceClassification, num_labels=1) and a LoRA adapter on every linear
layer; peft trains the head whole (SEQ_CLS puts `score` in modules_to_save). TRL's
RewardTrainer minimises -log sigmoid(r(chosen) - r(rejected)) over either the run's kept
preference pairs or every better/worse pair within each prompt of a ranked or flat EFT
file. The adapter is merged and the full model saved as runs/<run>/models/<name>/ (the
adapter in <name>/adapter/). Then, in one transaction, it is recorded like every model:
a `models` row (kind 'reward-model', parent its base, the sha256 of its weights), its
steps in `training_steps` (kind 'reward'), and its held-out judge metrics in
`eval_metrics`.
"""

from __future__ import annotations

import re
import shutil
from itertools import combinations
from pathlib import Path

from selfreward.backends.models import device, free_memory, load_tokenizer, merge_adapter
from selfreward.training.fit import (LogRows, common_args, final_loss, lora_config, model_row, quiet, scratch,
                                     tracking)
from selfreward.errors import SelfRewardError

KIND = "reward-model"      # models.kind
STEP_KIND = "reward"       # training_steps.kind
POLICY_NAME = re.compile(r"M\d+")  # the loop names its models M0, M1, ...: never a reward model's name
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
DEFAULT_LR = 1e-4  # TRL's RewardConfig default: a fresh head needs more than the DPO rates of the presets


class RewardLogRows(LogRows):
    """LogRows under RewardTrainer's names: its `accuracy` and `margin` are the share of the step's
    pairs whose chosen response out-scores the rejected one, and the mean logit difference."""

    def __init__(self, round: int, model: str):
        super().__init__(round, STEP_KIND)
        self.model = model

    def on_log(self, args, state, control, logs=None, **kwargs):
        before = len(self.rows)
        super().on_log(args, state, control, logs=logs, **kwargs)
        for row in self.rows[before:]:
            row.update(model=self.model, rewards_accuracy=logs.get("accuracy"), rewards_margin=logs.get("margin"))


# --- data ---

def run_pairs(run) -> list[dict]:
    """Every kept preference pair of the run (all rounds), as texts."""
    return run.rows(
        "select x.round, p.text as prompt, c.text as chosen, r.text as rejected from pairs x "
        "join prompts p on p.id = x.prompt_id join candidates c on c.id = x.chosen_id "
        "join candidates r on r.id = x.rejected_id where x.status = 'kept' order by x.id")


def ranked_pairs(path: str | Path) -> list[dict]:
    """Every better/worse pair within each prompt of a ranked or flat EFT file; responses the
    humans ranked alike pair with nothing."""
    from selfreward.evaluation.judge_quality import load_eval_set

    pairs = []
    for g in load_eval_set(path):
        for i, j in combinations(range(len(g.responses)), 2):
            if g.preference[i] == g.preference[j]:
                continue
            hi, lo = (i, j) if g.preference[i] > g.preference[j] else (j, i)
            pairs.append({"prompt": g.instruction, "chosen": g.responses[hi], "rejected": g.responses[lo]})
    return pairs


# --- training ---

def load_classifier(path: str, pad_token_id: int | None = None):
    """The policy's body under a fresh one-logit score head, on the device. The head reads each
    sequence's last token that is not padding, so it needs the tokenizer's pad id."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    try:
        # The head is new and the checkpoint's lm_head unused: expected, so not reported.
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SelfRewardError(f"cannot load '{path}' with a sequence-classification head: "
                              f"{str(e).splitlines()[0]}") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.to(device())


def train_reward_model(base_path: str, pairs: list[dict], cfg, out: Path, *, round: int, epochs: float,
                       lr: float, batch: int, tag: str = "") -> tuple[list[dict], dict]:
    """Train a reward model on `pairs` from the body at `base_path` and write it to `out` (merged
    weights and tokenizer; the adapter in out/adapter). Returns (logged step rows, info).
    Always on a full-precision body (load_in_4bit is the policy's setting): the merged head and
    body are what the judge loads."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    tokenizer = load_tokenizer(base_path)
    set_seed(cfg.seed)  # the score head starts from random weights
    model = load_classifier(base_path, tokenizer.pad_token_id)
    logs = RewardLogRows(round, out.name)
    work = scratch(out)
    try:
        with tracking(cfg, out):  # TensorBoard logs outlive the scratch folder
            # The run's lora_dropout applies (TRL would switch every dropout off by default).
            args = RewardConfig(**common_args(cfg, str(work), lr, lr / 10, batch, epochs, tag),
                                disable_dropout=False, dataset_num_proc=None)
            trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                    peft_config=lora_config(cfg, "SEQ_CLS"), callbacks=[logs])
            used = len(trainer.train_dataset)  # RewardTrainer drops pairs longer than max_length
            if not used:
                raise SelfRewardError(f"all {len(pairs)} pairs are longer than max_length={cfg.max_length} tokens; "
                                      f"nothing to train on")
            quiet(trainer).train()
            adapter = work / "adapter"
            trainer.model.save_pretrained(adapter)
            del trainer, model
            free_memory()
        merge_adapter(base_path, adapter, out, load=lambda path: load_classifier(path, tokenizer.pad_token_id))
        shutil.move(str(adapter), out / "adapter")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        loss = final_loss(logs.rows, f"reward model {out.name}", "lower --lr")
    except SelfRewardError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    info = {"method": STEP_KIND, "four_bit": False, "steps": len(logs.rows), "final_loss": loss,
            "pairs": used, "pairs_too_long": len(pairs) - used, "epochs": epochs, "learning_rate": lr,
            "batch_size": batch}
    return logs.rows, info


def accuracy(folder: Path, pairs: list[dict]) -> float:
    """Share of pairs whose chosen response the saved model, loaded as the `reward-model` judge,
    scores above the rejected one."""
    from selfreward.backends.judges import Group
    from selfreward.backends.judges.reward_model import RewardModelJudge

    judge = RewardModelJudge(str(folder))
    results = judge.judge_groups([Group(p["prompt"], [p["chosen"], p["rejected"]]) for p in pairs], 1, 0)
    judge.close()
    wins = sum(r.verdicts[0][0].parsed.score > r.verdicts[1][0].parsed.score for r in results)
    return wins / len(pairs)


# --- the command ---

def pick_base(run, name: str | None) -> dict:
    """The policy model whose body the reward model starts from: `name`, or the newest M_t."""
    if name is None:
        row = run.db.execute("select name from models where kind != ? order by round desc, created_at desc "
                             "limit 1", [KIND]).fetchone()
        if row is None:
            raise SelfRewardError(f"run {run.path} has no model yet; run `selfreward iterate` first")
        name = row[0]
    model = run.model(name)
    if model["kind"] == KIND:
        raise SelfRewardError(f"{name} is a reward model; --base takes a policy model of the run (M0, M1, ...)")
    return model


def pick_name(run, name: str | None, base: dict) -> str:
    """The new model's name: `name`, or RM<t> after its base M_t (RM<t>-2, -3, ... when taken)."""
    taken = {r["name"] for r in run.rows("select name from models")}
    if name is None:
        stem = f"RM{base['round']}"
        name = next(n for n in [stem, *(f"{stem}-{k}" for k in range(2, len(taken) + 3))] if n not in taken)
    if not NAME.fullmatch(name):
        raise SelfRewardError(f"bad model name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                              f"not starting with '.'")
    if POLICY_NAME.fullmatch(name):
        raise SelfRewardError(f"{name} is how the loop names its policy models; choose another --name")
    if name in taken:
        raise SelfRewardError(f"run {run.path} already has a model {name}; choose another --name")
    return name


def train_rm(run, source: str = "pairs", base: str | None = None, name: str | None = None,
             epochs: float | None = None, lr: float = DEFAULT_LR, batch: int | None = None,
             held_out: str | None = None) -> dict:
    """Train, evaluate on held-out data and record a reward model in a run opened as a writer."""
    from selfreward.evaluation.judge_commands import eval_judge
    from selfreward.evaluation.judge_quality import load_eval_set

    cfg = run.config()
    parent = pick_base(run, base)
    name = pick_name(run, name, parent)
    if held_out is None and cfg.eft_eval and Path(cfg.eft_eval).is_file():
        held_out = cfg.eft_eval
    if held_out:
        load_eval_set(held_out)  # a bad held-out file fails now, not after training
    if source == "pairs":
        pairs = run_pairs(run)
        if not pairs:
            raise SelfRewardError(f"run {run.path} has no kept preference pairs; train from a ranked file "
                                  f"with --from FILE, or run more rounds")
        rounds = sorted({p["round"] for p in pairs})
        what = f"{len(pairs)} kept pairs of round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}"
    else:
        if not Path(source).is_file():
            raise SelfRewardError(f"training data not found: {source} (--from takes 'pairs' or a ranked/EFT file)")
        pairs = ranked_pairs(source)
        if not pairs:
            raise SelfRewardError(f"{source}: no prompt has two responses ranked differently; no pairs to train on")
        what = f"{len(pairs)} ranked pairs from {Path(source).name}"
    base_path = run.model_path(parent["name"])  # checks the base's weights against their hash
    out = run.path / "models" / name
    steps, info = train_reward_model(
        base_path, pairs, cfg, out, round=parent["round"], epochs=epochs or cfg.dpo_epochs, lr=lr,
        batch=batch or cfg.dpo_batch_size, tag=f"{run.path.name}-{name}-reward")
    info.update(source=source, train_accuracy=accuracy(out, pairs), held_out=held_out)
    note = f"Bradley-Terry reward model on {what}" + (
        f" ({info['pairs_too_long']} longer than max_length left out)" if info["pairs_too_long"] else "")
    row = model_row(run, name, parent["round"], KIND, parent["name"], out, out / "adapter", note, info)
    # One transaction: the model, its steps and its held-out metrics are recorded together or not at
    # all (the eval's own write nests as a savepoint). Its folder is already in place and fsynced.
    with run.db.atomic():
        evals = eval_judge(run, {"judge": "reward-model", "judge_model": str(out)}, [], held_out, 0, 1,
                           verbosity=True, label=name) if held_out else []
        run.db["training_steps"].insert_all(steps)
        run.db["models"].insert(row)
    return {"name": name, "path": str(out), "base": parent["name"], "data": what, **info,
            "eval": evals[0] if evals else None}
