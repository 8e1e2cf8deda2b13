"""A judge that answers from a fixed list of raw outputs (tests, demos of failure handling)."""

from __future__ import annotations

import json
from pathlib import Path

from selfreward.errors import SelfRewardError
from selfreward.backends.judges.base import PointwiseJudge, Verdict
from selfreward.prompts import Template


class ScriptedJudge(PointwiseJudge):
    """Raw outputs used in order and cycled, parsed by the template's parser like any judge's."""

    def __init__(self, outputs: list[str], template: Template):
        if not outputs:
            raise SelfRewardError("scripted judge needs at least one output")
        self.outputs, self.template, self.name = list(outputs), template, "scripted"
        self.template_sha = template.sha256
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

    def score_many(self, items, samples, seed):
        result = []
        for _ in items:
            row = []
            for _ in range(samples):
                raw = self.outputs[self._next % len(self.outputs)]
                self._next += 1
                row.append(Verdict(raw, self.template.parse(raw)))
            result.append(row)
        return result
