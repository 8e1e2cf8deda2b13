"""Judge backends, picked by name from a plain table (see `build_judge`).

| name           | what scores                                         | rationale kept |
|----------------|-----------------------------------------------------|----------------|
| `self`         | the policy M_t with a prompt in prompts/ (any mode) | yes            |
| `api`          | any OpenAI-compatible endpoint, same prompts        | yes            |
| `pairrm`       | PairRM (DeBERTa-v3 pairwise reward model)           | comparisons    |
| `reward-model` | any sequence-classification model                   | no (score)     |
| `scripted`     | a fixed list of raw outputs (tests)                 | yes            |
"""

from __future__ import annotations

from typing import Callable

from selfreward.backends.engines import Engine, Sampling
from selfreward.errors import SelfRewardError
from selfreward.backends.judges.base import Comparison, Group, GroupResult, Judge, PointwiseJudge, Verdict
from selfreward.backends.judges.llm import MODES, EngineBackend, LLMJudge

JUDGES = ("self", "api", "pairrm", "reward-model", "scripted")
DEFAULT_PAIRRM = "llm-blender/PairRM-hf"

__all__ = ["JUDGES", "MODES", "Comparison", "Group", "GroupResult", "Judge", "PointwiseJudge", "Verdict",
           "build_judge"]


def build_judge(cfg, engine_for: Callable[[], Engine], label: str, checkpoint=None) -> Judge:
    """The judge named by cfg.judge; `engine_for()` loads the policy only for the self judge.
    With a checkpoint, an API judge keeps each answered request (they cost money)."""
    sampling = Sampling(cfg.judge_temperature, cfg.judge_top_p, cfg.judge_max_new_tokens, 0)
    if cfg.judge == "self":
        return LLMJudge(EngineBackend(engine_for(), sampling, label), cfg.judge_mode)
    if cfg.judge == "api":
        from selfreward.backends.judges.api import ApiBackend

        backend = ApiBackend(cfg.judge_api_base, cfg.judge_api_model, sampling, cfg.judge_api_key_env,
                             cfg.judge_api_concurrency, cfg.judge_api_timeout, cfg.judge_api_max_retries,
                             checkpoint=checkpoint)
        return LLMJudge(backend, cfg.judge_mode)
    if cfg.judge == "pairrm":
        from selfreward.backends.judges.pairrm import PairRMJudge

        return PairRMJudge(cfg.judge_model or DEFAULT_PAIRRM)
    if cfg.judge == "reward-model":
        from selfreward.backends.judges.reward_model import RewardModelJudge

        if not cfg.judge_model:
            raise SelfRewardError("judge 'reward-model' needs judge_model: a sequence-classification model")
        return RewardModelJudge(cfg.judge_model)
    if cfg.judge == "scripted":
        from selfreward.backends.judges.scripted import ScriptedJudge
        from selfreward.prompts import load_template

        return ScriptedJudge.from_file(cfg.judge_script, load_template(MODES[cfg.judge_mode]))
    raise SelfRewardError(f"unknown judge '{cfg.judge}'; choose one of: {', '.join(JUDGES)}")
