"""The judge interface. Every backend answers `judge_groups`: for each prompt
(a Group of its responses), K Verdicts per response, plus any pairwise
Comparisons made on the way (pairwise mode, PairRM), kept for auditing.

A Verdict's score is None, with a reason, whenever the judge's output could not
be read; nothing else is ever put in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from selfreward.prompts import Parsed


@dataclass(frozen=True)
class Group:
    instruction: str
    responses: list[str]
    reference: str | None = None  # for reference-guided grading


@dataclass(frozen=True)
class Verdict:
    raw: str | None          # the judge's own output (None for score-only models)
    parsed: Parsed           # score | None, rationale, reason
    n_tokens: int | None = None
    usage: dict | None = None  # API token usage: prompt_tokens, completion_tokens
    retries: int = 0           # requests repeated before this answer (openai engine)
    finish_reason: str | None = None  # "stop", "length" (cut off at the token limit) or "error"
    probs: dict | None = None  # next-token probabilities of the scores "0".."5" after the rationale
    expected: float | None = None  # their expected value (normalised over 0..5): the logprob-weighted score
    endpoint: str | None = None      # API judges: the server that answered, without credentials or query
    served_model: str | None = None  # and the model it says answered


@dataclass(frozen=True)
class Comparison:
    """Responses a and b (indices in their Group) compared in both orders."""

    a: int
    b: int
    sample: int
    outcome: str            # "a", "b", "tie", "inconsistent" (the orders disagree) or "unparsed"
    ab: Verdict             # a shown first
    ba: Verdict             # b shown first


@dataclass
class GroupResult:
    verdicts: list[list[Verdict]]                      # [response][sample]
    comparisons: list[Comparison] = field(default_factory=list)


class Judge(Protocol):
    name: str                  # e.g. "self:M1", "api:qwen", "pairrm:llm-blender/PairRM-hf"
    template_sha: str | None   # hash of the prompt template, None for reward models

    def judge_groups(self, groups: list[Group], samples: int, seed: int) -> list[GroupResult]: ...


class PointwiseJudge:
    """Base for judges that score one response at a time: subclasses give `score_many`."""

    name: str
    template_sha: str | None = None

    def score_many(self, items: list[tuple[Group, int]], samples: int, seed: int) -> list[list[Verdict]]:
        raise NotImplementedError

    def judge_groups(self, groups, samples, seed):
        items = [(g, i) for g in groups for i in range(len(g.responses))]
        flat = iter(self.score_many(items, samples, seed))
        return [GroupResult([next(flat) for _ in g.responses]) for g in groups]


class LocalModelJudge:
    """Base for judges backed by a local scoring model (PairRM, reward models).

    The model loads at the first judging, so building the judge (and checking a
    config) costs nothing; `close()` frees it before training needs the memory.
    """

    kind: str
    template_sha: str | None = None

    def __init__(self, source: str, batch_size: int = 8):
        self.source, self.batch_size = source, batch_size
        self.name = f"{self.kind}:{source}"
        self._loaded = None

    def _load(self, source: str):
        raise NotImplementedError

    def load(self):
        if self._loaded is None:
            self._loaded = self._load(self.source)
        return self._loaded

    def close(self) -> None:
        self._loaded = None
