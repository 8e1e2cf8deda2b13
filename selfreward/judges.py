"""Judge backends behind one interface, picked by name.

`judge(requests, samples, seed)` returns, for each (instruction, response),
`samples` Verdicts. Every verdict keeps the judge's raw text; its score is None
with a reason whenever the parser could not read one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from selfreward.engines import Engine, Sampling
from selfreward.errors import SelfRewardError
from selfreward.prompts import Parsed, Template


@dataclass(frozen=True)
class Verdict:
    raw: str
    parsed: Parsed
    n_tokens: int | None = None


class Judge(Protocol):
    name: str
    template: Template

    def judge(self, requests: list[tuple[str, str]], samples: int, seed: int) -> list[list[Verdict]]: ...


class SelfJudge:
    """The policy judges itself: the additive prompt as a user turn, sampled."""

    def __init__(self, engine: Engine, template: Template, sampling: Sampling, label: str):
        self.engine, self.template, self.sampling = engine, template, sampling
        self.name = f"self:{label}"

    def judge(self, requests, samples, seed):
        prompts = [[{"role": "user", "content": self.template.render(instruction=i, response=r)}]
                   for i, r in requests]
        sampling = Sampling(self.sampling.temperature, self.sampling.top_p, self.sampling.max_new_tokens, seed)
        outs = self.engine.generate(prompts, samples, sampling, desc="judge")
        return [[Verdict(c.text, self.template.parse(c.text), c.n_tokens) for c in per] for per in outs]


class ScriptedJudge:
    """Answers from a fixed list of raw outputs, in order, cycling; parsed like any judge's."""

    def __init__(self, outputs: list[str], template: Template):
        if not outputs:
            raise SelfRewardError("scripted judge needs at least one output")
        self.outputs, self.template, self.name = list(outputs), template, "scripted"
        self._next = 0

    @classmethod
    def from_file(cls, path: str, template: Template) -> "ScriptedJudge":
        p = Path(path)
        if not p.is_file():
            raise SelfRewardError(f"judge script not found: {path}")
        try:
            outputs = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SelfRewardError(f"judge script {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise SelfRewardError(f"judge script {path} must hold a JSON list of strings")
        return cls(outputs, template)

    def judge(self, requests, samples, seed):
        result = []
        for _ in requests:
            row = []
            for _ in range(samples):
                raw = self.outputs[self._next % len(self.outputs)]
                self._next += 1
                row.append(Verdict(raw, self.template.parse(raw)))
            result.append(row)
        return result


JUDGES = ("self", "scripted")
