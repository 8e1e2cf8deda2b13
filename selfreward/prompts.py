"""Prompt templates (files in prompts/ with declared variables) and their parsers.

A template file starts with `#` header lines, among them `# variables: a, b` and
`# parser: name`, then a line `---`, then the body with `{a}` placeholders. The
declared variables must equal the placeholders, checked at load.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

from selfreward.config import PROMPTS_DIR
from selfreward.errors import SelfRewardError


@dataclass(frozen=True)
class Parsed:
    """A judge output read by a parser: a score, or None with the reason why not."""

    score: float | None
    rationale: str
    reason: str | None = None


# --- the additive 5-point parser ---

# `Score: N` with an optional `/D` denominator; markdown bold around it is common.
_SCORE = re.compile(
    r"""(?P<quote>["'`“‘]?)\**score\**\s*:\s*\**\s*(?P<value>[+-]?\d+(?:\.\d+)?)(?:\s*/\s*(?P<den>\d+))?""",
    re.IGNORECASE,
)


def parse_additive(text: str) -> Parsed:
    """Read the judge's own last `Score: N`, N an integer in 0..5.

    Never invents a score: anything else is None with a reason. A `Score:` that
    opens a quotation (the judge quoting the response) is not the judge's own.
    """
    if not text or not text.strip():
        return Parsed(None, "", "empty output")
    matches = [m for m in _SCORE.finditer(text) if not m.group("quote")]
    if not matches:
        if _SCORE.search(text):
            return Parsed(None, text.strip(), "only a quoted 'Score:' found, none of the judge's own")
        return Parsed(None, text.strip(), "no 'Score: N' in output")
    m = matches[-1]
    rationale = text[: m.start()].strip()
    value, den = m.group("value"), m.group("den")
    if den is not None and den != "5":
        return Parsed(None, rationale, f"score given out of {den}, not out of 5: '{m.group(0).strip()}'")
    if not re.fullmatch(r"[+-]?\d+", value):
        return Parsed(None, rationale, f"non-integer score {value}: additive points are whole numbers")
    score = int(value)
    if not 0 <= score <= 5:
        return Parsed(None, rationale, f"score {score} outside 0..5")
    return Parsed(float(score), rationale)


_VERDICT = re.compile(r"""(?P<quote>["'`“‘]?)\**verdict\**\s*:\s*\**\s*\[*(?P<value>a|b|tie)\b""", re.IGNORECASE)
PAIRWISE_SCORES = {"a": 1.0, "b": 0.0, "tie": 0.5}


def parse_pairwise(text: str) -> Parsed:
    """Read the judge's own last `Verdict: A|B|tie` as 1.0 (A better), 0.0 (B better) or 0.5."""
    if not text or not text.strip():
        return Parsed(None, "", "empty output")
    matches = [m for m in _VERDICT.finditer(text) if not m.group("quote")]
    if not matches:
        return Parsed(None, text.strip(), "no 'Verdict: A|B|tie' in output")
    m = matches[-1]
    return Parsed(PAIRWISE_SCORES[m.group("value").lower()], text[: m.start()].strip())


PARSERS = {"additive": parse_additive, "pairwise": parse_pairwise}


# --- templates ---

@dataclass(frozen=True)
class Template:
    name: str
    body: str
    variables: frozenset[str]
    parser: str
    sha256: str

    def render(self, **values: str) -> str:
        missing = self.variables - values.keys()
        extra = values.keys() - self.variables
        if missing or extra:
            raise SelfRewardError(f"template {self.name}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        # Substitute by hand: user text may contain braces, which str.format would choke on.
        out = self.body
        for key, value in values.items():
            out = out.replace("{" + key + "}", value)
        return out

    def parse(self, text: str) -> Parsed:
        return PARSERS[self.parser](text)


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
