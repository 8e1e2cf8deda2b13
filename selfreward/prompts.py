"""Prompt templates (files in selfreward/templates/ with declared variables) and their parsers.

A template file starts with `#` header lines, among them `# variables: a, b` and
`# parser: name`, then a line `---`, then the body with `{a}` placeholders. The
declared variables must equal the placeholders, checked at load.

Rendering treats every value as data. It substitutes in one pass over the body's own
placeholders, so `{response}` inside an instruction stays literal text. And it escapes,
inside values, every `<` that would open or close one of the body's tagged sections:
`</response>` becomes `<\\/response>`, `<response_b>` becomes `<\\response_b>`. A candidate
therefore cannot end its section early and write instructions after it; the judge still
reads what it wrote. The escape is deterministic (a random boundary per render would
change the prompt each time), so a render is a pure function and prefix caching works.

The parsers read the judge's own final `Score:` or `Verdict:`; see `parse_additive`.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from pathlib import Path

from selfreward.errors import SelfRewardError

# The package's templates (config.PROMPTS_DIR re-exports it: config reads no prompt, prompts read no config).
PROMPTS_DIR = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class Parsed:
    """A judge output read by a parser: a score, or None with the reason why not."""

    score: float | None
    rationale: str
    reason: str | None = None
    at: int | None = None  # where the score's value starts in the text (additive parser), for its probabilities


# --- finding the judge's own final label ---

# Every pattern below reads each character one way only: no two quantifiers next to each other may take the
# same characters (`[ \t]*` beside `[ \t]*` across an empty group). Such a pair lets the engine try every split
# of a run of spaces, and a judge output of "Score: 4", 1,600 spaces and a letter took 5 s, 8x per doubling.

# Markdown emphasis around a label or a value: **Score:** 4, __Score: 4__, *Score: 4*.
_EMPH = r"(?:\*\*|__|\*|_)"
# Optional emphasis before a label or a value, with the space after it.
_MD = rf"(?:{_EMPH}[ \t]*)?"
# What may follow the value on its line: the closing emphasis, a full stop, trailing space.
_END = r"[\s*_]*(?:[.!][\s*_]*)?"
# The longest rest of a score or verdict line read; a real one is a few dozen characters.
_LINE_MAX = 10_000

CUT_OFF = "cut off by the token limit before the score line was complete"


def _own_label(word: str) -> re.Pattern:
    # The judge's own label starts a line (after indentation, a list bullet or a heading mark) or a
    # sentence (after '.', '!' or '?' and a space: judges often end their paragraph with it). Anything
    # else, such as `(Score: 5)`, `«Score: 5»`, `Subscore: 5` or `It writes: Score: 5`, is text the
    # judge quotes or describes, not its verdict.
    return re.compile(rf"(?:^[ \t]*(?:(?:[-*+]|\#{{1,6}})[ \t]+)?|(?<=[.!?])[ \t]+){_MD}{word}{_EMPH}?[ \t]*:",
                      re.IGNORECASE | re.MULTILINE)


def _last_own(label: re.Pattern, text: str) -> tuple[re.Match, str, bool] | None:
    """The last own label, the rest of its line, and whether a newline ends that line."""
    matches = list(label.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    end = text.find("\n", m.end())
    return m, text[m.end(): len(text) if end < 0 else end], end >= 0


def _shown(m: re.Match, rest: str) -> str:
    line = (m.group(0) + rest).strip()
    return repr(line if len(line) <= 80 else line[:79] + "…")


# --- the additive 5-point parser ---

_SCORE_LABEL = _own_label("score")
_ANY_SCORE = re.compile(r"score[\s*_]*:", re.IGNORECASE)
# `N`, `N/D` or `N out of D`; the denominator is checked to be 5 below, so `4 out of 10` fails loudly.
_SCORE_VALUE = re.compile(rf"[ \t]*{_MD}(?P<value>[+-]?\d+(?:\.\d+)?)"
                          r"(?:[ \t]*(?:/|out[ \t]+of\b)[ \t]*(?P<den>\d+(?:\.\d+)?))?", re.IGNORECASE)
_SCORE_END = re.compile(rf"(?:[\s*_]*points?\b)?{_END}", re.IGNORECASE)


def parse_additive(text: str, truncated: bool = False) -> Parsed:
    """Read the judge's own final `Score: N`, N an integer in 0..5.

    The judge's own `Score:` starts a line (optionally indented, after a `- ` bullet or a `#`
    heading mark, in markdown bold) or a sentence (after `. `, `! ` or `? `). Of those the last
    counts, and its line must hold only the score: `Score: 4`, `**Score:** 4.`, `Score: 4 points`,
    `Score: 4/5` and `Score: 4 out of 5` are read; `Score: 4 out of 10`, `Score: 4 because ...`
    are not. `Score: 4.0` is read as 4: an integral number is unambiguous, while `4.5` is
    rejected since additive points are whole.

    `truncated` says the output hit the token limit. Then the score line must end with a newline:
    a last line without one may be cut mid-way (`Score: 4/` of `4/10`), so it counts as unparsed.

    Never invents a score: anything else is None with a reason.
    """
    if not text or not text.strip():
        return Parsed(None, "", "empty output")
    found = _last_own(_SCORE_LABEL, text)
    if found is None:
        if truncated:
            return Parsed(None, text.strip(), CUT_OFF)
        if _ANY_SCORE.search(text):
            return Parsed(None, text.strip(), "only a 'Score:' inside a sentence found (quoted, in brackets or "
                                              "after other words), none of the judge's own")
        return Parsed(None, text.strip(), "no 'Score: N' in output")
    m, rest, line_ended = found
    rationale = text[: m.start()].strip()
    if truncated and not line_ended:
        return Parsed(None, rationale, CUT_OFF)
    if len(rest) > _LINE_MAX:
        return Parsed(None, rationale, f"the last 'Score:' line is over {_LINE_MAX:,} characters: {_shown(m, rest)}")
    v = _SCORE_VALUE.match(rest)
    if v is None:
        return Parsed(None, rationale, f"no 'Score: N' in output: the last 'Score:' has no number: {_shown(m, rest)}")
    den = v.group("den")
    if den is not None and Decimal(den) != 5:
        return Parsed(None, rationale, f"score given out of {den}, not out of 5: {_shown(m, rest)}")
    if not _SCORE_END.fullmatch(rest, v.end()):
        return Parsed(None, rationale, f"unexpected text after the score on its line: {_shown(m, rest)}")
    # Decimal, not int: int() refuses strings of more than 4300 digits.
    value = Decimal(v.group("value"))
    if value != value.to_integral_value():
        return Parsed(None, rationale, f"non-integer score {value}: additive points are whole numbers")
    if not 0 <= value <= 5:
        return Parsed(None, rationale, f"score {v.group('value')} outside 0..5")
    return Parsed(float(value), rationale, at=m.end() + v.start("value"))


# --- the pairwise parser ---

_VERDICT_LABEL = _own_label("verdict")
_VERDICT_VALUE = re.compile(rf"[ \t]*{_MD}(?:\[[ \t]*)?(?P<value>a|b|tie)(?:[ \t]*\])?{_END}", re.IGNORECASE)
PAIRWISE_SCORES = {"a": 1.0, "b": 0.0, "tie": 0.5}


def parse_pairwise(text: str, truncated: bool = False) -> Parsed:
    """Read the judge's own final `Verdict: A|B|tie` as 1.0 (A better), 0.0 (B better) or 0.5.

    The label is found as in `parse_additive`, and its line must hold exactly A, B or tie
    (`Verdict: a tie` or `Verdict: A is better` are unparsed). `truncated` works the same way.
    """
    if not text or not text.strip():
        return Parsed(None, "", "empty output")
    found = _last_own(_VERDICT_LABEL, text)
    if found is None:
        return Parsed(None, text.strip(), CUT_OFF if truncated else "no 'Verdict: A|B|tie' in output")
    m, rest, line_ended = found
    rationale = text[: m.start()].strip()
    if truncated and not line_ended:
        return Parsed(None, rationale, CUT_OFF)
    if len(rest) > _LINE_MAX:
        return Parsed(None, rationale, f"the last 'Verdict:' line is over {_LINE_MAX:,} characters: {_shown(m, rest)}")
    v = _VERDICT_VALUE.fullmatch(rest)
    if v is None:
        return Parsed(None, rationale, f"the last 'Verdict:' is not exactly A, B or tie: {_shown(m, rest)}")
    return Parsed(PAIRWISE_SCORES[v.group("value").lower()], rationale)


PARSERS = {"additive": parse_additive, "pairwise": parse_pairwise}


# --- templates ---

@dataclass(frozen=True)
class Template:
    name: str
    body: str
    variables: frozenset[str]
    parser: str
    sha256: str

    @cached_property
    def _placeholder(self) -> re.Pattern:
        # Only the declared names: other braces in the body are text.
        return re.compile(r"\{(" + "|".join(map(re.escape, sorted(self.variables))) + r")\}")

    @cached_property
    def _tag_open(self) -> re.Pattern | None:
        # A `<` in a value that starts a tag named like one of the body's sections, as a prefix and in
        # any case, so `</response_a>`, `</RESPONSE>` and `< /response>` are all caught.
        names = sorted(set(re.findall(r"</([A-Za-z]+)", self.body)))
        return re.compile(r"<(?=\s*(?:/\s*)?(?:" + "|".join(names) + "))", re.IGNORECASE) if names else None

    def render(self, **values: str) -> str:
        missing = self.variables - values.keys()
        extra = values.keys() - self.variables
        if missing or extra:
            raise SelfRewardError(f"template {self.name}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        values = {k: self.escape(v) for k, v in values.items()}
        # One pass: a substituted value is never scanned again, so `{response}` inside the instruction
        # (or `{response_b}` inside response A) stays literal text.
        return self._placeholder.sub(lambda m: values[m.group(1)], self.body)

    def escape(self, value: str) -> str:
        """A value as the judge sees it: a tag that could end its section is written `<\\/...`."""
        return self._tag_open.sub(r"<\\", value) if self._tag_open is not None else value

    def parse(self, text: str, truncated: bool = False) -> Parsed:
        return PARSERS[self.parser](text, truncated)


def load_template(name: str, directory: Path = PROMPTS_DIR) -> Template:
    path = Path(name) if name.endswith(".txt") else directory / f"{name}.txt"
    if not path.is_file():
        raise SelfRewardError(f"prompt template not found: {path}")
    text = path.read_text()
    head, sep, body = text.partition("\n---\n")
    if not sep:
        raise SelfRewardError(f"template {path}: missing the '---' line between header and body")
    header = {}
    for line in head.splitlines():
        m = re.match(r"#\s*(\w+):\s*(.*)", line)
        if m:
            header[m.group(1)] = m.group(2).strip()
    declared = frozenset(v.strip() for v in header.get("variables", "").split(",") if v.strip())
    used = frozenset(f for _, f, _, _ in string.Formatter().parse(body) if f)
    if declared != used:
        raise SelfRewardError(f"template {path}: declares {sorted(declared)} but uses {sorted(used)}")
    parser = header.get("parser", "")
    if parser not in PARSERS and parser != "instruction":
        raise SelfRewardError(f"template {path}: unknown parser '{parser}'")
    body = body.rstrip("\n")
    return Template(path.stem, body, declared, parser, hashlib.sha256(body.encode()).hexdigest()[:16])
