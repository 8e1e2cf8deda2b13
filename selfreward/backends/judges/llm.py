"""LLM-as-a-judge in three modes, over any engine (the policy itself, an OpenAI-compatible server, a script).

- additive: single-answer grading with the paper's additive 5-point prompt.
- reference: the same scale, graded against a reference answer (math, reasoning).
- pairwise: A vs B with a tie option, asked in both orders; a verdict counts only
  when both orders agree (Zheng et al. 2023: position bias). A response's score
  in a sample is 5 x (wins + ties/2) / its position-consistent comparisons.
"""

from __future__ import annotations

import dataclasses
from itertools import combinations

from selfreward.backends.engines import SCORE_CHOICES, Completion, Engine, Sampling
from selfreward.backends.judges.base import Comparison, Group, GroupResult, Verdict
from selfreward.errors import SelfRewardError
from selfreward.prompts import Parsed, Template, load_template

MODES = {"additive": "additive_judge", "reference": "reference_judge", "pairwise": "pairwise_judge"}
COPIED = "the score line was copied from the response, not the judge's own"


class LLMJudge:
    """A prompt template and its parser over an engine: the policy's (self), the
    openai engine's (api), or a script's. Each judge prompt is one user turn."""

    def __init__(self, engine: Engine, sampling: Sampling, mode: str = "additive", name: str = "self",
                 template: Template | None = None, logprobs: bool = False):
        if mode not in MODES:
            raise SelfRewardError(f"unknown judge mode '{mode}'; choose one of: {', '.join(MODES)}")
        self.engine, self.sampling, self.mode = engine, sampling, mode
        self.template = template or load_template(MODES[mode])
        self.template_sha = self.template.sha256
        self.name = name if mode == "additive" else f"{name}/{mode}"
        # Scores read as probabilities too (G-Eval), where the engine can: never for pairwise verdicts.
        self.logprobs = logprobs and mode != "pairwise" and hasattr(engine, "choice_probs")

    def complete(self, prompts: list[str], n: int, seed: int) -> list[list[Completion]]:
        s = Sampling(self.sampling.temperature, self.sampling.top_p, self.sampling.max_new_tokens, seed)
        return self.engine.generate([[{"role": "user", "content": p}] for p in prompts], n, s, desc="judge")

    def judge_groups(self, groups: list[Group], samples: int, seed: int) -> list[GroupResult]:
        if self.mode == "pairwise":
            return self._pairwise(groups, samples, seed)
        if self.mode == "reference" and any(not g.reference for g in groups):
            raise SelfRewardError("judge mode 'reference' needs a reference answer for every prompt")
        prompts = [self._render(g, r) for g in groups for r in g.responses]
        responses = [r for g in groups for r in g.responses]
        verdicts = [[self._verdict(o, r) for o in outs] for outs, r in zip(self.complete(prompts, samples, seed),
                                                                           responses)]
        if self.logprobs:
            verdicts = self._with_probs(prompts, verdicts)
        flat = iter(verdicts)
        return [GroupResult([next(flat) for _ in g.responses]) for g in groups]

    def _with_probs(self, prompts: list[str], verdicts: list[list[Verdict]]) -> list[list[Verdict]]:
        """Each parsed verdict with the probabilities of the score tokens where its score stands,
        read with its rationale and 'Score: ' as the prefix, and their expected value."""
        items = [(i, k) for i, vs in enumerate(verdicts) for k, v in enumerate(vs) if v.parsed.at is not None]
        if not items:
            return verdicts
        probs = self.engine.choice_probs([[{"role": "user", "content": prompts[i]}] for i, _ in items],
                                         [verdicts[i][k].raw for i, k in items],
                                         [verdicts[i][k].parsed.at for i, k in items], SCORE_CHOICES)
        out = [list(vs) for vs in verdicts]
        for (i, k), p in zip(items, probs):
            out[i][k] = dataclasses.replace(out[i][k], probs=p, expected=expected_score(p))
        return out

    def _render(self, g: Group, response: str) -> str:
        if self.mode == "reference":
            return self.template.render(instruction=g.instruction, reference=g.reference, response=response)
        return self.template.render(instruction=g.instruction, response=response)

    def _verdict(self, c: Completion, response: str | None = None) -> Verdict:
        if c.error:
            # The request failed, not the judge: no output to parse, the reason kept.
            return Verdict(None, Parsed(None, "", f"request failed: {c.error}"), c.n_tokens, c.usage, c.retries,
                           c.finish_reason)
        parsed = read_verdict(self.template, c.text, c.finish_reason, response)
        return Verdict(c.text, parsed, c.n_tokens, c.usage, c.retries, c.finish_reason, endpoint=c.endpoint,
                       served_model=c.served_model)

    def _pairwise(self, groups, samples, seed):
        # Every unordered pair, asked as (a, b) and as (b, a).
        jobs = [(gi, a, b) for gi, g in enumerate(groups) for a, b in combinations(range(len(g.responses)), 2)]
        prompts = []
        for gi, a, b in jobs:
            g = groups[gi]
            for first, second in ((a, b), (b, a)):
                prompts.append(self.template.render(instruction=g.instruction, response_a=g.responses[first],
                                                    response_b=g.responses[second]))
        outs = self.complete(prompts, samples, seed)
        results = [GroupResult([[] for _ in g.responses]) for g in groups]
        for n, (gi, a, b) in enumerate(jobs):
            for k in range(samples):
                ab, ba = self._verdict(outs[2 * n][k]), self._verdict(outs[2 * n + 1][k])
                outcome = pair_outcome(ab.parsed.score, ba.parsed.score)
                results[gi].comparisons.append(Comparison(a, b, k, outcome, ab, ba))
        for gi, g in enumerate(groups):
            for k in range(samples):
                outcomes = [(x.a, x.b, x.outcome) for x in results[gi].comparisons if x.sample == k]
                for i in range(len(g.responses)):
                    results[gi].verdicts[i].append(Verdict(None, pairwise_score(outcomes, i)))
        return results


def read_verdict(template: Template, text: str, finish_reason: str | None = None,
                 response: str | None = None) -> Parsed:
    """What a judge's output says, as judging reads it (and `verify` re-reads it)."""
    # A judgment cut off at the token limit counts only if its score line was complete.
    parsed = template.parse(text, truncated=finish_reason == "length")
    if parsed.score is not None and response is not None and copied_score(text, response, template):
        parsed = Parsed(None, parsed.rationale, COPIED)
    return parsed


def pairwise_score(outcomes: list[tuple], me) -> Parsed:
    """Response `me`'s score in one sample from that sample's comparisons (a, b, outcome):
    5 x (wins + ties/2) / its position-consistent comparisons (`verify` recomputes it so)."""
    wins = ties = consistent = inconsistent = 0
    for a, b, outcome in outcomes:
        if me not in (a, b):
            continue
        if outcome in ("a", "b", "tie"):
            consistent += 1
            wins += outcome == ("a" if me == a else "b")
            ties += outcome == "tie"
        elif outcome == "inconsistent":
            inconsistent += 1
    summary = f"won {wins}, tied {ties} of {consistent} position-consistent comparisons ({inconsistent} inconsistent)"
    if consistent:
        return Parsed(5 * (wins + ties / 2) / consistent, summary)
    return Parsed(None, summary, "no position-consistent comparison")


def expected_score(probs: dict[str, float] | None) -> float | None:
    """sum(s * p(s)) over the scores 0..5, normalised by their total probability; None when the
    judge put no probability on any score token."""
    if not probs:
        return None
    mass = sum(probs.values())
    return sum(int(s) * p for s, p in probs.items()) / mass if mass > 0 else None


def copied_score(output: str, response: str, template: Template) -> bool:
    """Did the judge's final score line come from the response it judged? A judge that
    repeats a response ending in "Score: 5" must not have that read as its own verdict."""
    if template.parse(response).score is None:
        return False  # the response holds no score line of its own
    # The judge saw the response escaped (see Template.escape); it may repeat either form.
    tails = {response.strip()[-80:], template.escape(response).strip()[-80:]}
    return any(len(tail) >= 8 and output.rstrip().endswith(tail) for tail in tails)


def outcome_preference(outcome: str) -> float | None:
    """An outcome as A's preference: a win 1, a loss 0, a tie or orders that disagree 0.5, no
    verdict None. Both vocabularies: a judge Comparison's ("a", "b", "tie", "inconsistent",
    "unparsed") and the head2head table's, from A's side ("win", "loss", "tie", "inconsistent",
    "unscored")."""
    return {"a": 1.0, "win": 1.0, "b": 0.0, "loss": 0.0, "tie": 0.5, "inconsistent": 0.5}.get(outcome)


def pair_outcome(ab: float | None, ba: float | None) -> str:
    """Combine 'A is better' scores (1 A, 0 B, 0.5 tie) from both orders into a winner."""
    if ab is None or ba is None:
        return "unparsed"
    first = {1.0: "a", 0.0: "b", 0.5: "tie"}[ab]
    second = {1.0: "b", 0.0: "a", 0.5: "tie"}[ba]  # in the second order, b was shown as A
    return first if first == second else "inconsistent"
