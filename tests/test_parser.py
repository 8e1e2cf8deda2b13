import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfreward.prompts import CUT_OFF, load_template, parse_additive, parse_pairwise


@pytest.mark.parametrize("text, score", [
    ("The answer is relevant and complete.\nScore: 4", 4.0),
    ("Score: 0", 0.0),
    ("Mostly right. **Score: 5**", 5.0),             # a sentence start counts as well as a line start
    ("score: 3", 3.0),
    ("Total. Score: 4/5", 4.0),                      # out of 5, said explicitly
    ("Score: 4 out of 5", 4.0),
    ("Score: 2 points", 2.0),
    ("First pass:\nScore: 2\nOn reflection:\nScore: 3", 3.0),  # several lines: the last one counts
    ('The response ends with "Score: 5" but is wrong. Score: 1', 1.0),  # quoted text is not the judge's
    ("Fine.\n**Score:** 4", 4.0),
    ("Fine.\n  - **Score: 3**.", 3.0),
    ("Fine.\n## Score: 2", 2.0),
    ("Score: 4.0", 4.0),                             # an integral number is read (see parse_additive)
    ("Score: 5.00/5", 5.0),
    ("Good.\nScore: 4\r\n", 4.0),
])
def test_reads_the_last_own_score(text, score):
    parsed = parse_additive(text)
    assert parsed.score == score
    assert parsed.reason is None


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ("A fine answer, I would give it full marks.", "no 'Score: N'"),
    ("Score: 4.5", "non-integer"),
    ("Score: 4.05", "non-integer"),
    ("Score: 6", "outside 0..5"),
    ("Score: -1", "outside 0..5"),
    ("Score: " + "9" * 5000, "outside 0..5"),    # longer than int() accepts
    ("Score: 8/10", "out of 10"),
    ("Score: 4 out of 10", "out of 10"),
    ("Score: five", "no 'Score: N'"),
    ('The response says "Score: 5" and nothing else.', "quoted"),
    # Not the judge's own final score: mid-word, in brackets or quotes, or after other words.
    ("Subscore: 5", "quoted"),
    ("(Score: 5)", "quoted"),
    ("«Score: 5»", "quoted"),
    ("The response writes: Score: 5", "quoted"),
    ("Relevant, so Score: 5", "quoted"),
    ("> Score: 5", "quoted"),
    # The judge's own line, but more on it than the score.
    ("Score: 4 because it is good", "unexpected text"),
    ("Score: 4/", "unexpected text"),
    ("Score: 3\nRevised.\nScore: 4 out of 10", "out of 10"),  # the last one counts, even when bad
])
def test_failures_are_none_with_a_reason(text, reason):
    parsed = parse_additive(text)
    assert parsed.score is None  # never 0 or -1 in place of a failure
    assert reason in parsed.reason


def test_rationale_is_the_text_before_the_score():
    parsed = parse_additive("Relevant, answers most of it.\n\nScore: 3")
    assert parsed.rationale == "Relevant, answers most of it."


@pytest.mark.parametrize("text, score", [
    ("A is clearer.\nVerdict: A", 1.0),
    ("First is better. Verdict: A", 1.0),
    ("Verdict: B", 0.0),
    ("Verdict: tie", 0.5),
    ("**Verdict:** [B].", 0.0),
    ("Verdict: A\nOn reflection:\nVerdict: tie", 0.5),
    ('B says "Verdict: A" to fool me.\nVerdict: B', 0.0),
])
def test_pairwise_reads_the_last_own_verdict(text, score):
    parsed = parse_pairwise(text)
    assert parsed.score == score
    assert parsed.reason is None


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("Verdict: a tie", "not exactly A, B or tie"),   # the article "a" is not response A
    ("Verdict: A is better", "not exactly A, B or tie"),
    ("Verdict: C", "not exactly A, B or tie"),
    ("They write: Verdict: A", "no 'Verdict"),
    ("(Verdict: B)", "no 'Verdict"),
    ("I cannot decide.", "no 'Verdict"),
])
def test_pairwise_failures_are_none_with_a_reason(text, reason):
    parsed = parse_pairwise(text)
    assert parsed.score is None
    assert reason in parsed.reason


# --- outputs cut off by the token limit ---

@pytest.mark.parametrize("text, score", [
    ("Good.\nScore: 4\n", 4.0),                      # the score line ended
    ("Good.\nScore: 4\nAlso, the answer could", 4.0),  # the judge went on after it
    ("Good.\nScore: 4", None),                       # may be the start of `Score: 4/10`
    ("Good.\nScore: 4/", None),
    ("Good.\nScore:", None),
    ("Good. Score: 3\nRevised:\nScore: 4", None),    # the last score line counts, and it is cut
    ("The response is relevant and", None),
])
def test_truncated_outputs_need_a_complete_score_line(text, score):
    parsed = parse_additive(text, truncated=True)
    assert parsed.score == score
    if score is None:
        assert parsed.reason == CUT_OFF


def test_truncation_flag_defaults_to_false_and_reaches_every_parser():
    assert parse_additive("Good.\nScore: 4").score == 4.0
    assert parse_pairwise("Verdict: A").score == 1.0
    assert parse_pairwise("Verdict: A", truncated=True).reason == CUT_OFF
    assert parse_pairwise("Verdict: A\n", truncated=True).score == 1.0
    t = load_template("additive_judge")
    assert t.parse("Score: 2").score == 2.0
    assert t.parse("Score: 2", truncated=True).reason == CUT_OFF


def test_template_declares_its_variables(tmp_path):
    t = load_template("additive_judge")
    assert t.variables == {"instruction", "response"}
    text = t.render(instruction="What is {x}?", response="x is {y}")  # braces in user text are fine
    assert "What is {x}?" in text and "<response>x is {y}</response>" in text
    assert t.parse("Score: 2").score == 2.0

    bad = tmp_path / "bad.txt"
    bad.write_text("# variables: instruction\n# parser: additive\n---\n{instruction} {response}\n")
    from selfreward.errors import SelfRewardError

    with pytest.raises(SelfRewardError, match="declares"):
        load_template(str(bad))


# --- fuzzing: no crash, scores in range, every failure explained ---

FRAGMENTS = ["Score", "score", "SCORE", "Subscore", ":", " ", "  ", "\t", "\n", "\r\n", "0", "1", "3", "4", "5",
             "6", "10", "-", "+", "/", "/5", "/10", ".", ".0", ".5", "**", "*", "__", "_", "- ", "# ", "> ",
             '"', "'", "`", "“", "”", "«", "»", "(", ")", "[", "]", "out of", " points", "Verdict", "verdict",
             "A", "B", "a", "b", "tie", "a tie", "Tie", "The response writes: ", "Good. ", "!", "?", "9" * 40,
             # whole labels, so that some texts parse and the accepting paths get fuzzed too
             "\nScore: ", "Score: 4", "\n**Score:** ", "Verdict: ", "\nVerdict: B", "\nVerdict: tie"]


def _join(picks: bytes, noise: str) -> str:
    # Each byte picks a fragment or, now and then, the random text: lists of strategies draw ~4x slower,
    # and 10,000 cases must stay within a few seconds.
    n = len(FRAGMENTS)
    return "".join(FRAGMENTS[k] if k < n else noise for k in (b % (n + 4) for b in picks))


TEXTS = st.builds(_join, st.binary(max_size=40), st.text(max_size=8))
FUZZ = settings(max_examples=5000, deadline=None, database=None)


def _check(parsed, allowed):
    if parsed.score is None:
        assert parsed.reason
    else:
        assert parsed.score in allowed and parsed.reason is None
    assert isinstance(parsed.rationale, str)


@FUZZ
@given(TEXTS)
def test_fuzz_additive(text):
    for truncated in (False, True):
        _check(parse_additive(text, truncated), {0.0, 1.0, 2.0, 3.0, 4.0, 5.0})


@FUZZ
@given(TEXTS)
def test_fuzz_pairwise(text):
    for truncated in (False, True):
        _check(parse_pairwise(text, truncated), {0.0, 0.5, 1.0})


@settings(max_examples=1000, deadline=None, database=None)
@given(TEXTS, st.integers(0, 5), st.sampled_from(["A", "B", "tie"]))
def test_fuzz_a_clean_final_line_always_wins(text, n, verdict):
    assert parse_additive(f"{text}\nScore: {n}").score == n
    assert parse_additive(f"{text}\nScore: {n}", truncated=True).reason == CUT_OFF
    assert parse_additive(f"{text}\nScore: {n}\n", truncated=True).score == n
    assert parse_pairwise(f"{text}\nVerdict: {verdict}").score == {"A": 1.0, "B": 0.0, "tie": 0.5}[verdict]


# --- degenerate outputs: the cost stays linear in the text ---

# Each shape once made the parsers (or the render of a hostile response) try every split of a long run:
# 1,600 spaces took 5 s, these 100,000 would take days. The child is killed at the bound, so a regression
# fails in seconds rather than hanging the suite; the bound is wide, as the parses take milliseconds.
DEGENERATE = """
from selfreward.prompts import load_template, parse_additive, parse_pairwise
N = 100_000
judge = load_template("additive_judge")
shapes = {
    "spaces after the score": lambda: parse_additive("Score: 4" + " " * N + "x"),
    "tabs after the score": lambda: parse_additive("Score: 4" + "\\t" * N + "x"),
    "emphasis after the score": lambda: parse_additive("Score: 4" + " *_" * (N // 3) + "x"),
    "full stops after the score": lambda: parse_additive("Score: 4" + " ." * (N // 2) + "x"),
    "spaces after points": lambda: parse_additive("Score: 4 points" + " " * N + "x"),
    "spaces before the value": lambda: parse_additive("Score:" + " " * N + "x"),
    "digits": lambda: parse_additive("Score: " + "9" * N + "x"),
    "spaces before the label": lambda: parse_additive("Good.\\n" + " " * N + "x"),
    "spaces after a sentence": lambda: parse_additive("Good." + " " * N + "x"),
    "spaces after the verdict": lambda: parse_pairwise("Verdict: A" + " " * N + "x"),
    "spaces before the verdict": lambda: parse_pairwise("Verdict:" + " " * N + "x"),
    "brackets around the verdict": lambda: parse_pairwise("Verdict: [A" + " " * N + "x"),
    "a tag of spaces in a response": lambda: judge.render(instruction="x", response="<" + " " * N + "x"),
}
print("ready", flush=True)
for name, parse in shapes.items():
    print(name, flush=True)
    parse()
print("done", flush=True)
"""


def test_degenerate_outputs_parse_in_linear_time():
    child = subprocess.Popen([sys.executable, "-c", DEGENERATE], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"  # the import is not timed: the machine may be busy
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    done = child.stdout.read().splitlines()
    assert done[-1] == "done", f"still parsing a text of {done[-1]} after 10 s"


def test_a_score_line_is_read_up_to_a_bound():
    # Trailing space is still read, up to a bound; a longer line is refused whole, never read in part.
    assert parse_additive("Score: 4" + " " * 9000).score == 4.0
    assert "over 10,000 characters" in parse_additive("Score: 4" + " " * 20_000).reason
    assert "over 10,000 characters" in parse_pairwise("Verdict: A" + " " * 20_000).reason
