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
entry in JUDGES: its builder and the facts about it (JudgeKind) that the config
checks, the loop, provenance and the eval commands ask for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from selfreward.backends.engines import Engine, Sampling
from selfreward.backends.judges.base import Comparison, Group, GroupResult, Judge, PointwiseJudge, Verdict
from selfreward.backends.judges.llm import MODES, LLMJudge
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


def _model_sha(cfg) -> str | None:
    from selfreward.backends.models import weights_sha

    return weights_sha(Path(cfg.judge_model)) if cfg.judge_model and Path(cfg.judge_model).is_dir() else None


def _script_sha(cfg) -> str:
    return hashlib.sha256(Path(cfg.judge_script).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class JudgeKind:
    """A judge: how to build it, and what the rest of the program needs to know about it."""

    build: Callable[..., Judge]         # (cfg, engine_for, label) -> Judge
    uses_policy: bool = False           # M_t judges: one instance per model, on the policy's engine
    llm: bool = False                   # a template and a parser over an engine: judge sampling applies
    # Judges as the policy does (Meta-Rewarding and CREAM train or reuse the policy's judging);
    # the scripted judge stands in for the self judge in tests: its script answers the meta-judge too.
    as_policy: bool = False
    holds_memory: bool = True           # keeps a model loaded: dropped before training needs the memory
    logprobs_by_default: bool = False   # an LLM judge reading score probabilities unless judge_logprobs=no
    weights: Callable[..., str | None] = lambda cfg: None  # provenance: the hash of what judges (not M_t)
    built_at_check: bool = False        # cheap to build (a client, a script): `check` builds it to test settings
    needs: dict[str, str] = field(default_factory=dict)  # settings it cannot go without: what each must name
    head2head_mode: str | None = None   # the mode of `eval head2head` ("which is better"), if not the configured
    modes: tuple[str, ...] = tuple(MODES)


JUDGES: dict[str, JudgeKind] = {
    "self": JudgeKind(_self, uses_policy=True, llm=True, as_policy=True, logprobs_by_default=True,
                      head2head_mode="pairwise"),
    "api": JudgeKind(_api, llm=True, holds_memory=False, built_at_check=True, head2head_mode="pairwise"),
    "pairrm": JudgeKind(_pairrm, weights=_model_sha),
    "reward-model": JudgeKind(_reward_model, weights=_model_sha,
                              needs={"judge_model": "a sequence-classification model (a folder or hub id)"}),
    "scripted": JudgeKind(_scripted, llm=True, as_policy=True, holds_memory=False, logprobs_by_default=True,
                          weights=_script_sha, built_at_check=True,
                          needs={"judge_script": "a JSON file with a list of raw judge outputs"}),
}

def pin_judge_models(cfg):
    """cfg with each judge model given as a hub id (PairRM's default too) pinned to the snapshot of its
    current revision, as M0 is: the run records that folder, hashes it, and loads it, so a later push
    to the repo never changes the judge. For the loop's judge and the eval judge."""
    import dataclasses

    from selfreward.backends.models import pin_hub_id

    pinned = {}
    for key, judge in (("judge_model", cfg.judge), ("eval_judge_model", cfg.eval_judge)):
        if JUDGES.get(judge) and JUDGES[judge].weights is _model_sha:
            spec = getattr(cfg, key) or (DEFAULT_PAIRRM if judge == "pairrm" else "")
            if (folder := pin_hub_id(spec)) != spec:
                pinned[key] = folder
    return dataclasses.replace(cfg, **pinned)


def independent_judges() -> list[str]:
    """The judges that can grade the policy from outside: neither the policy nor a stand-in for it."""
    return [name for name, kind in JUDGES.items() if not kind.uses_policy and not kind.as_policy]


__all__ = ["JUDGES", "MODES", "Comparison", "Group", "GroupResult", "Judge", "JudgeKind", "PointwiseJudge", "Verdict",
           "build_judge", "default_engines", "independent_judges", "judge_kind", "pin_judge_models", "read_logprobs"]


def judge_kind(cfg) -> JudgeKind:
    """cfg.judge's entry in JUDGES."""
    if cfg.judge not in JUDGES:
        raise SelfRewardError(f"unknown judge '{cfg.judge}'; choose one of: {', '.join(JUDGES)}")
    return JUDGES[cfg.judge]


def read_logprobs(cfg) -> bool:
    """Does the configured judge read score probabilities (judge_logprobs)?"""
    kind = JUDGES.get(cfg.judge)
    if kind is None or not kind.llm or cfg.judge_mode == "pairwise" or cfg.judge_logprobs == "no":
        return False
    return cfg.judge_logprobs == "yes" or kind.logprobs_by_default


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
    return judge_kind(cfg).build(cfg, engine_for or default_engines(cfg), label)
