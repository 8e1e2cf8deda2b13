"""Verifiable instruction following through if-verifiable's checkers: verdicts per constraint, unchecked
constraints kept apart with their reason, IFEval-format files checked line by line, and the embedded set."""

import json
import math
import os
import subprocess
import sys

import pytest

from selfreward.errors import SelfRewardError
from selfreward.evaluation.instruct import (FLOOR_ANSWER, check, checkers, default_if_eval, floor, load_if_eval,
                                            summarize, unchecked_reasons)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One row per instruction type of the embedded set: (id, kwargs, an answer that follows it, one that does not).
CASES = [
    ("punctuation:no_comma", {}, "Sunday mornings are slow and calm.", "Yes, mornings are calm."),
    ("length_constraints:number_words", {"num_words": 30, "relation": "less than"}, "A short answer.",
     " ".join(["word"] * 30)),
    ("count:word_count_range", {"min_words": 40, "max_words": 60}, " ".join(["word"] * 50),
     " ".join(["word"] * 61)),
    ("keywords:existence", {"keywords": ["garlic", "lemon"]}, "Roast chicken with Garlic and lemon.",
     "Roast chicken with garlic."),
    ("keywords:frequency", {"keyword": "buzz", "frequency": 4, "relation": "at least"},
     "Buzz buzz, the bee goes buzz and buzz.", "Buzz buzz, the bee goes buzz."),
    ("keywords:forbidden_words", {"forbidden_words": ["cute", "fluffy"]}, "A cat is a small hunter.",
     "A cat is Cute."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zany zebras at the zoo.", "Lions at the zoo."),
    ("language:response_language", {"language": "fr"},
     "J'aime beaucoup l'automne parce que les couleurs des arbres sont magnifiques et l'air est frais.",
     "I really like autumn because the colours of the trees are beautiful and the air is fresh."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Dogs are loyal.\n***\nThey keep us active.",
     "Dogs are loyal. They keep us active."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "practice"},
     "Learning takes time.\n\nPractice every day.", "Learning takes time.\n\nYou should practice every day."),
    ("detectable_content:number_placeholders", {"num_placeholders": 3},
     "Dear [name], the tap at [address] has leaked since [date].", "Dear landlord, the tap leaks."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "See you soon.\n\nP.S. Bring the book.",
     "See you soon."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* keys\n* wallet\n* phone", "* keys\n* wallet"),
    ("detectable_format:constrained_response", {}, "My answer is no.", "Penguins cannot fly."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "First *fold the paper*, then *crease the wings*.", "First *fold the paper*, then crease the wings."),
    ("detectable_format:multiple_sections", {"section_spliter": "Day", "num_sections": 2},
     "Day 1\nThe museum.\nDay 2\nThe park.", "Day 1\nThe museum and the park."),
    ("detectable_format:json_format", {}, '```json\n{"name": "France", "capital": "Paris"}\n```',
     "Name: France, capital: Paris"),
    ("detectable_format:title", {}, "<<Sea Song>>\nWaves roll in.", "Sea Song\nWaves roll in."),
    ("combination:two_responses", {}, "Bean There\n******\nDaily Grind", "Bean There\n******\nBean There"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "What is a good name for a pet goldfish?"},
     "What is a good name for a pet goldfish? Bubbles.", "Bubbles is a good name for a goldfish."),
    ("startend:end_checker", {"end_phrase": "Good luck!"}, "Put your phone away. Good luck!",
     "Good luck! Put your phone away."),
    ("change_case:english_capital", {},
     "THE LIBRARY WILL CLOSE EARLY TODAY. PLEASE RETURN YOUR BOOKS BEFORE THREE O'CLOCK.",
     "The library will close early today. Please return your books before three o'clock."),
    ("change_case:english_lowercase", {}, "i like to read a book and drink tea by the window in the evening.",
     "I like to read a book and drink tea by the window in the evening."),
    ("startend:quotation", {}, '"Thank you so much, but I cannot make it."', "Thank you, but I cannot make it."),
    ("format:output_template", {}, "My Answer: yes My Conclusion: it helps Future Outlook: bright",
     "Yes, learn to swim."),
    ("count:numbers", {"N": 3}, "A spider has 8 legs, a dog 4 and a bird 2.", "A spider has 8 legs and a dog 4."),
    ("format:newline", {}, "carrot\npea\nbean", "carrot pea bean"),
]


def item(*constraints, key="k", prompt="a prompt"):
    return {"key": key, "prompt": prompt, "instruction_id_list": [c[0] for c in constraints],
            "kwargs": [c[1] for c in constraints]}


@pytest.fixture
def no_nltk_data(tmp_path, monkeypatch):
    """NLTK finds no data at all (as on a machine where none was installed), whatever this one has."""
    import nltk
    from if_verifiable.ifeval import instructions_util

    checkers()  # imported before the path changes, as in a run
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    # The sentence tokenizer, once loaded, is cached for the process.
    instructions_util._get_sentence_tokenizer.cache_clear()
    yield
    instructions_util._get_sentence_tokenizer.cache_clear()


@pytest.mark.parametrize("instruction_id, kwargs, passing, failing", CASES, ids=[c[0] for c in CASES])
def test_each_type_passes_and_fails(instruction_id, kwargs, passing, failing):
    good = check(item((instruction_id, kwargs)), passing)
    assert good.fully_checked and good.passed_strict and good.passed_loose, good
    bad = check(item((instruction_id, kwargs)), failing)
    assert bad.fully_checked and bad.passed_strict is False, bad


def test_cases_cover_every_type_of_the_embedded_set():
    used = {iid for it in default_if_eval() for iid in it["instruction_id_list"]}
    assert used <= {c[0] for c in CASES}


def test_loose_forgives_a_preamble_line_and_asterisks_but_strict_does_not():
    result = check(item(("change_case:english_lowercase", {})),
                   "Sure! Here it is:\ni like to read a book and drink tea by the window in the evening.")
    assert result.constraints[0].passed_strict is False and result.constraints[0].passed_loose is True
    assert (result.passed_strict, result.passed_loose) == (False, True)
    assert summarize([result])["if_prompt_strict"] == 0.0 and summarize([result])["if_prompt_loose"] == 1.0


def test_an_empty_answer_fails_every_constraint():
    result = check(item(("punctuation:no_comma", {}), ("startend:quotation", {})), "  <think>no comma</think>  ")
    assert result.fully_checked and [c.passed_strict for c in result.constraints] == [False, False]
    assert [c.passed_loose for c in result.constraints] == [False, False]


def test_missing_nltk_data_leaves_the_constraint_unchecked_and_uncounted(no_nltk_data):
    mixed = check(item(("punctuation:no_comma", {}),
                       ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}),
                       key="mixed"), "One sentence. Two sentences.")
    no_comma, sentences = mixed.constraints
    assert no_comma.checked and no_comma.passed_strict is True
    assert not sentences.checked and sentences.passed_strict is None and sentences.passed_loose is None
    assert "NLTK data 'punkt" in sentences.reason and "not installed" in sentences.reason
    assert not mixed.fully_checked and mixed.passed_strict is None and mixed.passed_loose is None

    full = check(item(("punctuation:no_comma", {}), key="full"), "Yes, it does.")
    metrics = summarize([mixed, full])
    # The prompt with an unchecked constraint is in no prompt-level score, as neither a pass nor a fail.
    assert metrics["if_checked"] == 1 and metrics["if_unchecked"] == 1 and metrics["if_prompts"] == 2
    assert metrics["if_prompt_strict"] == 0.0 and metrics["if_prompt_loose"] == 0.0
    assert metrics["if_inst_checked"] == 2 and metrics["if_inst_unchecked"] == 1
    assert metrics["if_inst_strict"] == 0.5
    assert unchecked_reasons([mixed, full]) == {sentences.reason: 1}
    assert mixed.to_row()["constraints"][1] == {"instruction_id": "length_constraints:number_sentences",
                                                "passed_strict": None, "passed_loose": None,
                                                "reason": sentences.reason}


def test_importing_the_checkers_never_downloads(tmp_path):
    # if_verifiable.ifbench calls nltk.download at import for every resource it lacks.
    code = ("import nltk\n"
            "def refuse(*a, **k): raise SystemExit('nltk.download called: ' + repr(a))\n"
            "nltk.download = refuse\n"
            "from selfreward.evaluation.instruct import checkers\n"
            "assert 'count:word_count_range' in checkers() and nltk.download is refuse\n")
    env = {**os.environ, "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("constraint, reason", [
    (("detectable_format:from_the_future", {"x": 1}), "unknown instruction id"),
    (("keywords:existence", {}), "kwargs leave keywords unset: the checker would draw them at random"),
    (("length_constraints:number_words", {"num_words": 5}), "kwargs leave relation unset"),
    (("length_constraints:number_words", {"num_words": 5, "relation": "at most"}), "checker error: ValueError"),
    (("punctuation:no_comma", {"strict": True}), "checker error: TypeError"),
    (("combination:repeat_prompt", {}), "checker error: ValueError: prompt_to_repeat must be set."),
])
def test_a_constraint_that_cannot_be_checked_says_why(constraint, reason):
    result = check(item(constraint, ("punctuation:no_comma", {})), "No commas here.")
    first, second = result.constraints
    assert first.passed_strict is None and first.passed_loose is None and reason in first.reason
    assert second.checked and second.passed_strict is True
    metrics = summarize([result])
    assert math.isnan(metrics["if_prompt_strict"]) and math.isnan(metrics["if_prompt_strict_lo"])
    assert metrics["if_checked"] == 0 and metrics["if_unchecked"] == 1


def test_language_verdicts_do_not_change_between_calls():
    # langdetect draws at random; on a mixed text like this one it says 'de' or 'af' from call to call unless seeded.
    verdicts = {check(item(("language:response_language", {"language": "de"})), "die katze is fine").passed_strict
                for _ in range(30)}
    assert len(verdicts) == 1


def test_kwargs_given_as_null_count_as_unset():
    # Hub exports of IFEval give every kwargs key, unused ones null.
    kwargs = {"num_words": 3, "relation": "less than", "keywords": None, "language": None}
    assert check(item(("length_constraints:number_words", kwargs)), "Two words.").passed_strict is True


def test_summary_interval_is_wilson():
    results = [check(item(("punctuation:no_comma", {}), key=str(i)), "a, b" if i % 4 else "ab") for i in range(40)]
    metrics = summarize(results)
    assert metrics["if_prompt_strict"] == 0.25
    # Wilson 95% for 10/40, worked out by hand: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.95996.
    assert metrics["if_prompt_strict_lo"] == pytest.approx(0.1419, abs=1e-4)
    assert metrics["if_prompt_strict_hi"] == pytest.approx(0.4019, abs=1e-4)


GOOD = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize("line, message", [
    ('{"key": 2, "prompt": "x"', "malformed JSON"),
    ('["key", "prompt"]', "expected a JSON object, got list"),
    ('{"key": 2, "prompt": "x", "instruction_id_list": ["a"]}', "missing field 'kwargs'"),
    ('{"key": true, "prompt": "x", "instruction_id_list": ["a"], "kwargs": [{}]}', "field 'key'"),
    ('{"key": 2, "prompt": " ", "instruction_id_list": ["a"], "kwargs": [{}]}', "field 'prompt'"),
    ('{"key": 2, "prompt": "x", "instruction_id_list": "a", "kwargs": [{}]}', "field 'instruction_id_list'"),
    ('{"key": 2, "prompt": "x", "instruction_id_list": [], "kwargs": []}', "field 'instruction_id_list'"),
    ('{"key": 2, "prompt": "x", "instruction_id_list": ["a"], "kwargs": [3]}', "field 'kwargs' must be a list"),
    ('{"key": 2, "prompt": "x", "instruction_id_list": ["a", "b"], "kwargs": [{}]}',
     "'kwargs' has 1 entries for 2 instructions"),
    ('{"key": "1", "prompt": "x", "instruction_id_list": ["a"], "kwargs": [{}]}',
     "duplicate key '1' (first at line 1)"),
])
def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "ifeval.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps({**GOOD, "key": 3}) + "\n")
    with pytest.raises(SelfRewardError) as err:
        load_if_eval(path, limit=1)  # the whole file is checked, not only what the limit keeps
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_load_keeps_the_first_limit_and_makes_keys_strings(tmp_path):
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps({**GOOD, "key": k}) + "\n\n" for k in (7, 8, 9)))
    assert [it["key"] for it in load_if_eval(path)] == ["7", "8", "9"]
    assert [it["key"] for it in load_if_eval(path, limit=2)] == ["7", "8"]
    with pytest.raises(SelfRewardError, match="no prompts"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_if_eval(tmp_path / "empty.jsonl")
    with pytest.raises(SelfRewardError, match="not found"):
        load_if_eval(tmp_path / "missing.jsonl")


def test_embedded_set_meets_its_spec(no_nltk_data):
    items = default_if_eval()
    ids = [iid for it in items for iid in it["instruction_id_list"]]
    assert len(items) >= 120 and len(set(ids)) >= 15
    assert len({it["key"] for it in items}) == len(items)
    assert set(ids) <= set(checkers())
    # Every constraint is checkable without NLTK data: the floor leaves nothing unchecked.
    metrics = floor(items)
    assert metrics["if_unchecked"] == 0 and metrics["if_inst_unchecked"] == 0 and metrics["if_checked"] == len(items)
    assert default_if_eval(limit=5) == items[:5]


def test_floor_of_the_embedded_set():
    metrics = floor(default_if_eval())
    # The negative constraints (no commas, fewer than N words, forbidden words) pass on a fixed sentence.
    assert 0.05 < metrics["if_prompt_strict"] < 0.25
    assert metrics == summarize([check(it, FLOOR_ANSWER) for it in default_if_eval()])
