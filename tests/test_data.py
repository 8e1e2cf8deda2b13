import pytest

from selfreward.config import SEED_DIR
from selfreward.data import read_eft, read_ift
from selfreward.errors import SelfRewardError


def test_seed_data_meets_its_spec():
    ift, eft = read_ift(SEED_DIR / "ift_train.jsonl"), read_eft(SEED_DIR / "eft_train.jsonl")
    assert len(ift) >= 150 and len(eft) >= 150
    assert {r["score"] for r in eft} == set(range(6))
    assert all(len(r["justification"].split()) <= 100 for r in eft)
    held_ift, held_eft = read_ift(SEED_DIR / "ift_heldout.jsonl"), read_eft(SEED_DIR / "eft_heldout.jsonl")
    assert held_ift and held_eft
    # Held-out means held out: no instruction appears in both splits.
    assert not {r["instruction"] for r in ift} & {r["instruction"] for r in held_ift}
    assert not {r["instruction"] for r in eft} & {r["instruction"] for r in held_eft}


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "response": "b"}\n{"instruction": "c", \n', "x.jsonl:2: malformed JSON"),
    ('{"instruction": "a"}\n', "x.jsonl:1: missing field 'response'"),
    ('{"instruction": "  ", "response": "b"}\n', "x.jsonl:1: field 'instruction' is empty"),
    ('["a", "b"]\n', "x.jsonl:1: expected a JSON object"),
    ("\n\n", "no rows"),
])
def test_bad_ift_lines_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(SelfRewardError, match=message):
        read_ift(path)


def test_eft_score_must_be_an_integer_in_range(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "response": "b", "justification": "c", "score": 6}\n')
    with pytest.raises(SelfRewardError, match="outside 0..5"):
        read_eft(path)
    path.write_text('{"instruction": "a", "response": "b", "justification": "c", "score": "4"}\n')
    with pytest.raises(SelfRewardError, match="must be an integer"):
        read_eft(path)
    with pytest.raises(SelfRewardError, match="not found"):
        read_eft(tmp_path / "missing.jsonl")
