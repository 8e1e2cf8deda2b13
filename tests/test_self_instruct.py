from selfreward.core.stages.self_instruct import DedupePool, _tokens, parse_instruction, reject_reason, rouge_l


def test_rouge_l():
    assert rouge_l(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert rouge_l(["a", "b"], ["c", "d"]) == 0.0
    # LCS "a c" of lengths 3 and 2: P = 2/3, R = 1, F = 0.8
    assert abs(rouge_l(["a", "b", "c"], ["a", "c"]) - 0.8) < 1e-9


def test_parse_instruction_stops_at_next_item():
    assert parse_instruction(" Write a poem about rain.\n10. Another task") == "Write a poem about rain."
    assert parse_instruction("Plan a   trip\nto Rome.\n\nMore") == "Plan a trip to Rome."


def test_filters():
    pool = DedupePool([_tokens("Write a short poem about the sea")])
    kw = dict(min_words=4, max_words=150, threshold=0.7)
    assert reject_reason("Write poem", pool, **kw) == "too_short"
    assert reject_reason(" ".join(["word"] * 151), pool, **kw) == "too_long"
    assert reject_reason("Draw a picture of a cat for me", pool, **kw) == "blacklist"
    assert reject_reason("Write a short poem about the sea today", pool, **kw) == "near_duplicate"
    assert reject_reason("- List three uses of vinegar", pool, **kw) == "bad_start"
    assert reject_reason("List three household uses of vinegar", pool, **kw) is None
