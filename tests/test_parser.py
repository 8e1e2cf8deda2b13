import pytest

from selfreward.prompts import load_template, parse_additive


@pytest.mark.parametrize("text, score", [
    ("The answer is relevant and complete.\nScore: 4", 4.0),
    ("Score: 0", 0.0),
    ("Mostly right. **Score: 5**", 5.0),
    ("score: 3", 3.0),
    ("Total. Score: 4/5", 4.0),                      # out of 5, said explicitly
    ("Score: 2 points", 2.0),
    ("First pass Score: 2\nOn reflection, Score: 3", 3.0),  # several lines: the last one counts
    ('The response ends with "Score: 5" but is wrong. Score: 1', 1.0),  # quoted text is not the judge's
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
    ("Score: 6", "outside 0..5"),
    ("Score: -1", "outside 0..5"),
    ("Score: 8/10", "out of 10"),
    ("Score: five", "no 'Score: N'"),
    ('The response says "Score: 5" and nothing else.', "quoted"),
])
def test_failures_are_none_with_a_reason(text, reason):
    parsed = parse_additive(text)
    assert parsed.score is None  # never 0 or -1 in place of a failure
    assert reason in parsed.reason


def test_rationale_is_the_text_before_the_score():
    parsed = parse_additive("Relevant, answers most of it.\n\nScore: 3")
    assert parsed.rationale == "Relevant, answers most of it."


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
