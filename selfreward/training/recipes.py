"""Training recipes: SFT for M1, then M_t (t >= 2) from M_{t-1} by the configured method
(DPO with TRL's loss types and LD-DPO, the CREAM-weighted DPO, reference-free SimPO, or
online GRPO / RLOO), always with a LoRA adapter, on a 4-bit base where load_in_4bit says
so (QLoRA, CUDA or CPU), then merged into a full-precision reload of the base for the next
round (selfreward.training.fit).

Each recipe has a `*_trainer` function that makes the trainer's builder from the recipe's
data; the launched ranks (selfreward.training.worker) call the same functions, so they
build the very trainer of the one-process path. Only the optimisation step is delegated
to TRL's trainers.
"""

from __future__ import annotations

from pathlib import Path

from selfreward.backends.models import load_tokenizer
from selfreward.config import loss_types
from selfreward.training.fit import common_args, lora_config, tag, train
from selfreward.training.precision import pad_multiple


def sft(base_path: str, ift: list[dict], eft: list[tuple[str, str]], cfg, out: Path, round: int = 1):
    """M1 = SFT(M0) on IFT (instruction -> response) and EFT (judge prompt -> judgment).

    `eft` holds already-rendered (judge prompt, target) pairs. Loss is on the
    completion tokens only (TRL's prompt-completion format).
    """
    return train("sft", cfg, base_path, out, round, sft_trainer(base_path, ift, eft, cfg, out, round),
                 entry=("sft", {"ift": ift, "eft": eft}))


def sft_trainer(base_path: str, ift: list[dict], eft: list[tuple[str, str]], cfg, out: Path, round: int):
    """The SFT trainer's builder (see sft)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [{"prompt": [{"role": "user", "content": r["instruction"]}],
             "completion": [{"role": "assistant", "content": r["response"]}]} for r in ift]
    rows += [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": t}]}
             for p, t in eft]

    def build(model, work, callbacks):
        args = SFTConfig(**common_args(cfg, work, cfg.sft_learning_rate, cfg.sft_learning_rate_end,
                                       cfg.sft_batch_size, cfg.sft_epochs, tag(out, round, "sft")),
                         completion_only_loss=True, dataset_num_proc=None, pad_to_multiple_of=pad_multiple(cfg))
        return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=load_tokenizer(base_path), peft_config=lora_config(cfg),
                          callbacks=callbacks)

    return build


def method_label(cfg) -> str:
    """What trains M_t, as status and the report show it: 'dpo', 'dpo:ipo', 'dpo ld=0.5', 'simpo'."""
    if cfg.train_method == "simpo":
        return "simpo"
    label = "dpo" if loss_types(cfg) == ["sigmoid"] else "dpo:" + "+".join(loss_types(cfg))
    return (label + (f" ld={cfg.dpo_ld_alpha:g}" if cfg.dpo_ld_alpha < 1.0 else "")
            + (" cream" if cfg.consistency else ""))


def preference(base_path: str, pairs: list[dict], cfg, out: Path, round: int):
    """M_t from M_{t-1} on the round's pairs, by cfg.train_method:

    - dpo: TRL's DPOTrainer with the loss types of dpo_loss_type (and LD-DPO's ld_alpha
      below 1). The reference is M_{t-1} itself (the adapter switched off), as the paper
      trains from M_{t-1} against M_{t-1}.
    - simpo: TRL's CPO trainer with loss_type='simpo' and cpo_alpha=0. TRL's default
      cpo_alpha=1 adds a behaviour-cloning NLL term (CPO-SimPO); 0 is SimPO itself, which is
      reference-free: no reference pass, no reference model in memory.
    """
    rows, adapter, info = train(cfg.train_method, cfg, base_path, out, round,
                                preference_trainer(base_path, pairs, cfg, out, round),
                                entry=("preference", {"pairs": pairs}),
                                fit=(pairs, cfg.dpo_beta) if cfg.train_method == "dpo" else None)
    info["label"] = method_label(cfg)
    return rows, adapter, info


def preference_trainer(base_path: str, pairs: list[dict], cfg, out: Path, round: int):
    """The builder of cfg.train_method's trainer (see preference)."""
    from datasets import Dataset

    # CREAM: a pair's consistency C weights its loss (NULL: the previous judge did not order it, plain DPO).
    cream = any(p.get("consistency") is not None for p in pairs)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}],
                               **({"consistency": _c(p.get("consistency"))} if cream else {})} for p in pairs])

    def common(work):
        return common_args(cfg, work, cfg.dpo_learning_rate, cfg.dpo_learning_rate_end, cfg.dpo_batch_size,
                           cfg.dpo_epochs, tag(out, round, cfg.train_method))

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

    return {"dpo": build_dpo, "simpo": build_simpo}[cfg.train_method]


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


def online(base_path: str, prompts: list[dict], reward, cfg, out: Path, round: int):
    """GRPO or RLOO from base_path on the prompts, rewarded by `reward` (a TRL reward function,
    such as the rl stage's JudgeReward): (rows, adapter, info)."""
    import torch
    from datasets import Dataset

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["text"]}], "prompt_id": p["id"],
                               "instruction": p["text"]} for p in prompts])
    g = cfg.n_candidates
    per_step = min(cfg.rl_prompts_per_step, len(prompts))

    def build(model, work, callbacks):
        if cfg.train_method == "grpo":
            from trl import GRPOConfig as Config, GRPOTrainer as Trainer
        else:
            from trl import RLOOConfig as Config, RLOOTrainer as Trainer
        common = common_args(cfg, work, cfg.rl_learning_rate, cfg.rl_learning_rate_end, g * per_step,
                             cfg.rl_epochs, tag(out, round, cfg.train_method))
        # One prompt's group of samples per micro-batch, `per_step` prompts per optimiser step.
        common.update(per_device_train_batch_size=g, gradient_accumulation_steps=per_step)
        common.pop("max_length")
        cuda = torch.cuda.is_available()
        vllm = cfg.engine == "vllm" and cuda  # TRL's colocated vLLM generation needs CUDA
        extra = dict(use_vllm=True, vllm_mode="colocate",
                     vllm_gpu_memory_utilization=min(0.3, cfg.vllm_gpu_memory_utilization)) if vllm else {}
        args = Config(**common, num_generations=g, max_completion_length=cfg.candidate_max_new_tokens,
                      temperature=cfg.candidate_temperature, top_p=cfg.candidate_top_p, beta=cfg.rl_beta,
                      **extra)
        return Trainer(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                       processing_class=load_tokenizer(base_path), peft_config=lora_config(cfg),
                       callbacks=callbacks)

    return train(cfg.train_method, cfg, base_path, out, round, build)
