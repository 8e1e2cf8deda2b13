"""Verifiable instruction following: does an answer meet each constraint its prompt states?

Prompts come in IFEval's JSONL format (`key`, `prompt`, `instruction_id_list`, `kwargs`). The checkers are
if-verifiable's copies of the IFEval and IFBench registries; this module runs each constraint's checker on its own
and counts. A constraint whose checker cannot run (NLTK data not installed, an id newer than the checkers, kwargs
that leave it to chance, a checker that raises) is *unchecked*, with its reason: never a pass, never a fail, and a
prompt with one counts in no prompt-level score.

    items = default_if_eval()
    results = [check(item, answer) for item, answer in zip(items, answers)]
    summarize(results)  # {"if_prompt_strict": 0.41, "if_prompt_strict_lo": ..., "if_checked": 120, ...}
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import re
from importlib.metadata import version
from pathlib import Path

from selfreward.config import SEED_DIR
from selfreward.data import iter_jsonl
from selfreward.errors import SelfRewardError

DEFAULT_SET = SEED_DIR / "if_eval.jsonl"
# The floor: what answering every prompt with the same sentence already scores (negative constraints such as
# "no commas" or "fewer than 50 words" pass on it). A model is worth reporting only beside it.
FLOOR_ANSWER = "I can help with that."

# nltk's LookupError names the resource as `Resource 'punkt_tab' not found` (older versions colour the name).
_NLTK_RESOURCE = re.compile(r"Resource\s+(?:\x1b\[[0-9;]*m)?'?([\w./-]+)")


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One instruction's verdict. Unchecked: both verdicts None and `reason` says why."""
    instruction_id: str
    passed_strict: bool | None
    passed_loose: bool | None
    reason: str | None = None

    @property
    def checked(self) -> bool:
        return self.reason is None


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """An answer to one prompt and each of its constraints' verdicts, in the prompt's order."""
    key: str
    answer: str
    constraints: tuple[Constraint, ...]

    @property
    def fully_checked(self) -> bool:
        return all(c.checked for c in self.constraints)

    @property
    def passed_strict(self) -> bool | None:
        """Every constraint passes on the raw answer; None unless every constraint was checked."""
        return all(c.passed_strict for c in self.constraints) if self.fully_checked else None

    @property
    def passed_loose(self) -> bool | None:
        """Every constraint passes on some relaxation of the answer; None unless fully checked."""
        return all(c.passed_loose for c in self.constraints) if self.fully_checked else None

    def to_row(self) -> dict:
        """JSON-ready: key, answer, the prompt-level verdicts, and one dict per constraint."""
        return {"key": self.key, "answer": self.answer, "fully_checked": self.fully_checked,
                "passed_strict": self.passed_strict, "passed_loose": self.passed_loose,
                "constraints": [dataclasses.asdict(c) for c in self.constraints]}


def load_if_eval(path: str | Path, limit: int | None = None) -> list[dict]:
    """The prompts of an IFEval-format JSONL file, checked whole before anything runs; the first `limit` if set.

    Each item: {"key": str, "prompt": str, "instruction_id_list": [str], "kwargs": [dict]} (integer keys, as
    IFEval has them, become strings). Any malformed line raises SelfRewardError naming the file and line.
    """
    if limit is not None and limit < 0:
        raise SelfRewardError(f"the instruction-following limit must be 0 (all) or more, got {limit}")
    items, first_line = [], {}
    for where, row in iter_jsonl(path, "instruction-following file"):
        for name in ("key", "prompt", "instruction_id_list", "kwargs"):
            if name not in row:
                raise SelfRewardError(f"{where}: missing field '{name}'")
        key, prompt, ids, kwargs = row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"]
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).strip():
            raise SelfRewardError(f"{where}: field 'key' must be a non-empty string or an integer, got {key!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SelfRewardError(f"{where}: field 'prompt' must be a non-empty string")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i.strip() for i in ids):
            raise SelfRewardError(f"{where}: field 'instruction_id_list' must be a non-empty list of strings")
        if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
            raise SelfRewardError(f"{where}: field 'kwargs' must be a list of objects")
        if len(kwargs) != len(ids):
            raise SelfRewardError(f"{where}: 'kwargs' has {len(kwargs)} entries for {len(ids)} instructions "
                                  "(one object each)")
        key = str(key)
        if key in first_line:
            raise SelfRewardError(f"{where}: duplicate key {key!r} (first at line {first_line[key]})")
        first_line[key] = where.rsplit(":", 1)[1]
        items.append({"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})
    if not items:
        raise SelfRewardError(f"{path}: no prompts")
    return items[: limit or None]


def default_if_eval(limit: int | None = None) -> list[dict]:
    """The embedded set: verifiable prompts written for this project (none copied from IFEval or IFBench)."""
    return load_if_eval(DEFAULT_SET, limit)


@functools.cache
def checkers() -> dict[str, type]:
    """Instruction id -> checker class, from if-verifiable's IFEval and IFBench registries (their ids are disjoint)."""
    import langdetect
    import nltk

    # if_verifiable.ifbench calls nltk.download at import for each resource it lacks. A run never fetches (the
    # network may be closed, and a verdict must not depend on what a mirror served that day): those checkers'
    # constraints become unchecked instead.
    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as ifbench
    finally:
        nltk.download = download
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as ifeval

    # langdetect (the language and letter-case checkers) samples at random unless seeded: the same answer must get
    # the same verdict on every run.
    langdetect.DetectorFactory.seed = 0
    return {**ifbench, **ifeval}


def _build(cls: type, instruction_id: str, kwargs: dict, prompt: str):
    checker = cls(instruction_id)
    checker.build_description(**kwargs)
    # As if-verifiable's evaluate_instructions does: a checker that takes the prompt gets it.
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker


def _checker(instruction_id: str, kwargs: dict, prompt: str):
    """(checker, None), or (None, why it cannot be trusted to check)."""
    cls = checkers().get(instruction_id)
    if cls is None:
        return None, f"unknown instruction id (if-verifiable {version('if-verifiable')} has no checker for it)"
    given = {k: v for k, v in kwargs.items() if v is not None}
    # A checker draws each argument it is not given (or given out of range) at random: such a verdict would
    # change from run to run. Build it under two seeds and compare what it settled on.
    state = random.getstate()
    try:
        random.seed(0)
        checker = _build(cls, instruction_id, given, prompt)
        random.seed(1)
        again = _build(cls, instruction_id, given, prompt).get_instruction_args() or {}
    finally:
        random.setstate(state)
    settled = checker.get_instruction_args() or {}
    unset = sorted({k for k in checker.get_instruction_args_keys() if k != "prompt" and k not in given}
                   | {k for k in settled if settled[k] != again.get(k)})
    if unset:
        return None, f"kwargs leave {', '.join(unset)} unset: the checker would draw them at random"
    return checker, None


def _unchecked_reason(error: Exception) -> str:
    resource = _NLTK_RESOURCE.search(str(error)) if type(error) is LookupError else None
    if resource:
        return f"needs NLTK data '{resource.group(1)}', not installed (never downloaded at run time)"
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"checker error: {type(error).__name__}" + (f": {detail}" if detail else "")


def _verdict(instruction_id: str, kwargs: dict, prompt: str, answer: str, variants: list[str]) -> Constraint:
    try:
        checker, reason = _checker(instruction_id, kwargs, prompt)
        if reason:
            return Constraint(instruction_id, None, None, reason)
        if not answer.strip():
            return Constraint(instruction_id, False, False)
        strict = bool(checker.check_following(answer))
        # Loose: the answer passes under any of IFEval's relaxations (first or last line dropped, asterisks removed);
        # the first variant is the answer itself.
        loose = any(v.strip() and checker.check_following(v) for v in variants)
        return Constraint(instruction_id, strict, bool(loose))
    except Exception as e:  # noqa: BLE001 - a third-party checker's failure is this constraint's, not the run's
        return Constraint(instruction_id, None, None, _unchecked_reason(e))


def check(item: dict, answer: str) -> ItemResult:
    """Each of `item`'s constraints checked on `answer`, strict and loose, as IFEval defines them."""
    from if_verifiable.common import get_loose_transformations, strip_thinking

    # A reasoning model's <think> block is not part of its answer (as in if-verifiable's own evaluation).
    answer_text = strip_thinking(answer)
    variants = get_loose_transformations(answer_text)
    # The language checkers log "Unable to detect language" through the root logger for every answer
    # langdetect cannot read (emoji, digits): a verdict, not an error worth a line on the terminal.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        return ItemResult(
            key=item["key"], answer=answer,
            constraints=tuple(_verdict(iid, kwargs, item["prompt"], answer_text, variants)
                              for iid, kwargs in zip(item["instruction_id_list"], item["kwargs"])))
    finally:
        logging.disable(previous)


def _wilson(k: int, n: int) -> tuple[float, float]:
    if not n:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def summarize(results: list[ItemResult]) -> dict:
    """The metrics of a list of checked answers: counts, and shares that are NaN where nothing was checked (as in
    evaluation.judge_quality, so that `finite()` leaves them out of the store).

    Prompt-level scores count fully checked prompts only; instruction-level scores count checked constraints only.
    `if_prompt_strict_lo`/`_hi` is a 95% Wilson score interval (scipy) for `if_prompt_strict`.
    """
    full = [r for r in results if r.fully_checked]
    checked = [c for r in results for c in r.constraints if c.checked]
    n_constraints = sum(len(r.constraints) for r in results)
    strict = sum(r.passed_strict for r in full)
    lo, hi = _wilson(strict, len(full))

    def share(k: int, n: int) -> float:
        return k / n if n else math.nan

    return {
        "if_prompts": len(results),
        "if_checked": len(full),
        "if_unchecked": len(results) - len(full),
        "if_prompt_strict": share(strict, len(full)),
        "if_prompt_strict_lo": lo,
        "if_prompt_strict_hi": hi,
        "if_prompt_loose": share(sum(r.passed_loose for r in full), len(full)),
        "if_inst_checked": len(checked),
        "if_inst_unchecked": n_constraints - len(checked),
        "if_inst_strict": share(sum(c.passed_strict for c in checked), len(checked)),
        "if_inst_loose": share(sum(c.passed_loose for c in checked), len(checked)),
    }


def unchecked_reasons(results: list[ItemResult]) -> dict[str, int]:
    """How many constraints went unchecked for each reason, most frequent first."""
    counts: dict[str, int] = {}
    for c in (c for r in results for c in r.constraints if not c.checked):
        counts[c.reason] = counts.get(c.reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def floor(items: list[dict], answer: str = FLOOR_ANSWER) -> dict:
    """summarize() of answering every prompt with the same sentence: the score no model should be credited for."""
    return summarize([check(item, answer) for item in items])


def unchecked(item: dict, reason: str) -> ItemResult:
    """Every constraint of `item` unchecked for one reason (the model's answer never came: a failed request)."""
    return ItemResult(item["key"], "", tuple(Constraint(iid, None, None, reason)
                                             for iid in item["instruction_id_list"]))


def check_rows(item: dict, result: ItemResult) -> list[dict]:
    """One `if_checks` row per constraint: passed (1), failed (0), or unchecked (NULL, with the reason)."""
    import json

    checker = f"if-verifiable {version('if-verifiable')}"
    return [{"idx": k, "instruction_id": c.instruction_id, "kwargs": json.dumps(kwargs, sort_keys=True),
             "strict": None if c.passed_strict is None else int(c.passed_strict),
             "loose": None if c.passed_loose is None else int(c.passed_loose), "unchecked": c.reason,
             "checker": checker}
            for k, (c, kwargs) in enumerate(zip(result.constraints, item["kwargs"]))]
