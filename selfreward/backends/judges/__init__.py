"""Judge backends, picked by name from a plain dict (`JUDGES`).

| name           | what scores                                                   | rationale kept |
|----------------|---------------------------------------------------------------|----------------|
| `self`         | the policy M_t, on its engine, with a prompt in selfreward/templates/ | yes  |
| `api`          | any OpenAI-compatible server (the openai engine), same prompts | yes           |
| `pairrm`       | PairRM (DeBERTa-v3 pairwise reward model)                      | comparisons    |
| `reward-model` | any sequence-classification model                              | no (score)     |
| `scripted`     | a fixed list of raw outputs (tests), same prompts and parsers  | yes            |

LLM judges (self, api, scripted) are a template and a parser over an engine:
they never generate text themselves. Adding a judge means its module and one
entry in JUDGES.
"""

from __future__ import annotations

from typing import Callable

from selfreward.backends.engines import Engine, Sampling
from selfreward.backends.judges.base import Comparison, Group, GroupResult, Judge, PointwiseJudge, Verdict
from selfreward.backends.judges.llm import MODES, LLMJudge
from selfreward.config import read_logprobs
from selfreward.errors import SelfRewardError

DEFAULT_PAIRRM = "llm-blender/PairRM-hf"

# engine_for(kind) gives the engine an LLM judge runs on: "policy" (the model being
# judged with, M_t) or "api" (the openai engine from config). The caller decides how
# engines are made and kept (the loop keeps one per model and checkpoints them).
EngineFor = Callable[[str], Engine]


def judge_sampling(cfg) -> Sampling:
    return Sampling(cfg.judge_temperature, cfg.judge_top_p, cfg.judge_max_new_tokens, 0)


def _self(cfg, engine_for: EngineFor, label: str) -> Judge:
    return LLMJudge(engine_for("policy"), judge_sampling(cfg), cfg.judge_mode, f"self:{label}",
                    logprobs=read_logprobs(cfg))


def _api(cfg, engine_for: EngineFor, label: str) -> Judge:
    return LLMJudge(engine_for("api"), judge_sampling(cfg), cfg.judge_mode, f"api:{cfg.api_model}",
                    logprobs=read_logprobs(cfg))


def _pairrm(cfg, engine_for: EngineFor, label: str) -> Judge:
    from selfreward.backends.judges.pairrm import PairRMJudge

    return PairRMJudge(cfg.judge_model or DEFAULT_PAIRRM)


def _reward_model(cfg, engine_for: EngineFor, label: str) -> Judge:
    from selfreward.backends.judges.reward_model import RewardModelJudge

    if not cfg.judge_model:
        raise SelfRewardError("judge 'reward-model' needs judge_model: a sequence-classification model")
    return RewardModelJudge(cfg.judge_model)


def _scripted(cfg, engine_for: EngineFor, label: str) -> Judge:
    from selfreward.backends.judges.scripted import ScriptedEngine

    return LLMJudge(ScriptedEngine.from_file(cfg.judge_script), judge_sampling(cfg), cfg.judge_mode, "scripted",
                    logprobs=read_logprobs(cfg))


JUDGES: dict[str, Callable[..., Judge]] = {"self": _self, "api": _api, "pairrm": _pairrm,
                                           "reward-model": _reward_model, "scripted": _scripted}

__all__ = ["JUDGES", "MODES", "Comparison", "Group", "GroupResult", "Judge", "PointwiseJudge", "Verdict",
           "build_judge", "default_engines"]


def default_engines(cfg, policy: Callable[[], Engine] | None = None) -> EngineFor:
    """engine_for without a loop around it: the openai engine from config, and `policy()` if given."""
    from selfreward.backends.engines import make_engine

    def engine_for(kind: str) -> Engine:
        if kind == "api":
            return make_engine(cfg, "", name="openai")
        if policy is None:
            raise SelfRewardError("this command has no policy model to judge with; choose another judge")
        return policy()

    return engine_for


def build_judge(cfg, engine_for: EngineFor | None, label: str) -> Judge:
    """The judge named by cfg.judge; for the self judge, `label` names the model judging (M_t)."""
    if cfg.judge not in JUDGES:
        raise SelfRewardError(f"unknown judge '{cfg.judge}'; choose one of: {', '.join(JUDGES)}")
    return JUDGES[cfg.judge](cfg, engine_for or default_engines(cfg), label)
