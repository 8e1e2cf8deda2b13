"""The scripted judge's engine: a fixed list of raw outputs, used in order from
the start of each call and cycled (tests, demos of failure handling). The LLM
judge reads them with the same templates and parsers as a model's outputs, in
every judge mode. Each call starting afresh makes a stage's judgments depend
only on that stage, as a seeded model's do: a stage rerun after a crash gets
exactly what the uninterrupted run got.

An output is a string, or {"text": ..., "probs": {"4": 0.7, "5": 0.3}}: the
probabilities of the score tokens after its rationale, which the judge reads
for its expected score (judge_logprobs); a plain string gives none."""

from __future__ import annotations

import json
from pathlib import Path

from selfreward.backends.engines import Completion
from selfreward import failpoints
from selfreward.errors import SelfRewardError


class ScriptedEngine:
    name = "scripted"
    seeds_per_request = True  # nothing is sampled

    def __init__(self, outputs: list, source: str = "scripted"):
        if not outputs:
            raise SelfRewardError("scripted judge needs at least one output")
        self.outputs = [o if isinstance(o, str) else o["text"] for o in outputs]
        self.probs = {o["text"]: {str(k): float(v) for k, v in o["probs"].items()}
                      for o in outputs if isinstance(o, dict) and o.get("probs")}
        self.model_path = source

    @classmethod
    def from_file(cls, path: str) -> "ScriptedEngine":
        p = Path(path)
        if not p.is_file():
            raise SelfRewardError(f"judge script not found: {path}")
        try:
            outputs = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SelfRewardError(f"judge script {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(outputs, list) or not all(_valid(o) for o in outputs):
            raise SelfRewardError(f"judge script {path} must hold a JSON list of strings or of "
                                  f'{{"text": string, "probs": {{"0".."5": number}}}} objects')
        return cls(outputs, str(p))

    def generate(self, prompts, n, sampling, desc="", on_done=None):
        out, k = [], 0
        for i, _ in enumerate(prompts):
            row = []
            for _ in range(n):
                text = self.outputs[k % len(self.outputs)]
                k += 1
                row.append(Completion(text, len(text.split()), "stop"))
            out.append(row)
            if on_done:
                on_done(i, row)
            failpoints.hit("generated")  # the crash test can kill the process mid-judging
        return out

    def choice_probs(self, prompts, outputs, cuts, choices):
        """The script's own probabilities for an output, where it gave them."""
        return [{c: self.probs[o].get(c, 0.0) for c in choices} if o in self.probs else None for o in outputs]

    def chunk_prompts(self, n: int) -> int:
        return 1 << 30

    def close(self) -> None:
        pass


def _valid(output) -> bool:
    if isinstance(output, str):
        return True
    probs = output.get("probs", {}) if isinstance(output, dict) else None
    return (isinstance(output, dict) and isinstance(output.get("text"), str) and isinstance(probs, dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in probs.values()))
