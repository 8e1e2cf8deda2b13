"""OpenAssistant import (trees, flat JSONL, Parquet) and EFT targets from a judge."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from selfreward.data import read_eft, read_ift
from selfreward.errors import SelfRewardError
from selfreward.backends.engines import Sampling
from selfreward.backends.judges.llm import LLMJudge
from selfreward.backends.judges.scripted import ScriptedEngine
from selfreward.oasst import (downsample, filter_records, import_oasst, justification, make_eft, read_oasst,
                              to_eft_eval, to_ift, write_eft)
from selfreward.prompts import load_template
from selfreward.evaluation.judge_quality import load_eval_set


def msg(mid, text, role, lang="en", rank=None, replies=(), deleted=False, review=True):
    return {"message_id": mid, "text": text, "role": role, "lang": lang, "rank": rank, "deleted": deleted,
            "review_result": review, "replies": list(replies)}


# Three trees: an English one with a deleted reply, a null rank and a second turn (which must be ignored);
# an English one whose rank-0 reply failed review, plus a French reply; a Spanish one.
TREES = [
    {"message_tree_id": "t1", "prompt": msg("p1", "How can I keep a basil plant alive on a windowsill?", "prompter",
                                             replies=[
        msg("a11", "Give it six hours of sun, water when the top soil is dry, and pinch off flower buds.",
            "assistant", rank=0, replies=[msg("p12", "What about winter?", "prompter", replies=[
                msg("a13", "Move it away from cold glass.", "assistant", rank=0)])]),
        msg("a12", "Water it every day.", "assistant", rank=1),
        msg("a14", "Basil is an herb.", "assistant", rank=None),
        msg("a15", "A reply the author removed.", "assistant", rank=2, deleted=True),
    ])},
    {"message_tree_id": "t2", "prompt": msg("p2", "Write a two-line poem about a lighthouse.", "prompter", replies=[
        msg("a21", "A reply that moderators rejected.", "assistant", rank=0, review=False),
        msg("a22", "It turns all night above the sea,\nso ships come home to you and me.", "assistant", rank=1),
        msg("a23", "Lighthouse, light, house.", "assistant", rank=2),
        msg("a24", "Un phare brille dans la nuit.", "assistant", lang="fr", rank=None),
    ])},
    {"message_tree_id": "t3", "prompt": msg("p3", "¿Cuál es la capital de Perú?", "prompter", lang="es", replies=[
        msg("a31", "La capital de Perú es Lima.", "assistant", lang="es", rank=0),
        msg("a32", "Lima.", "assistant", lang="es", rank=1),
    ])},
]


def flatten(trees: list[dict]) -> list[dict]:
    """The same messages as oasst1 rows, breadth-first so row order differs from tree order."""
    rows, queue = [], [(t["message_tree_id"], t["prompt"], None) for t in trees]
    while queue:
        tree_id, m, parent = queue.pop(0)
        rows.append({"message_id": m["message_id"], "parent_id": parent, "message_tree_id": tree_id,
                     "text": m["text"], "role": m["role"], "lang": m["lang"], "rank": m["rank"],
                     "deleted": m["deleted"], "review_result": m["review_result"]})
        queue += [(tree_id, r, m["message_id"]) for r in m["replies"]]
    return rows


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def oasst_files(tmp_path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    trees = write_lines(tmp_path / "trees.jsonl", TREES)
    flat = write_lines(tmp_path / "flat.jsonl", flatten(TREES))
    parquet = tmp_path / "flat.parquet"
    pq.write_table(pa.Table.from_pylist(flatten(TREES)), parquet)
    gz = tmp_path / "trees.jsonl.gz"
    gz.write_bytes(gzip.compress(trees.read_bytes()))
    return {"trees": trees, "flat": flat, "parquet": parquet, "gz": gz}


EXPECTED_IFT = [{"instruction": "How can I keep a basil plant alive on a windowsill?",
                 "response": "Give it six hours of sun, water when the top soil is dry, and pinch off flower buds."}]
EXPECTED_EFT = [
    {"instruction": "How can I keep a basil plant alive on a windowsill?", "tree_id": "t1", "responses": [
        {"text": "Give it six hours of sun, water when the top soil is dry, and pinch off flower buds.", "rank": 0},
        {"text": "Water it every day.", "rank": 1}]},
    {"instruction": "Write a two-line poem about a lighthouse.", "tree_id": "t2", "responses": [
        {"text": "It turns all night above the sea,\nso ships come home to you and me.", "rank": 1},
        {"text": "Lighthouse, light, house.", "rank": 2}]},
]


def test_all_formats_give_the_same_sets(oasst_files):
    outputs = {}
    for name, path in oasst_files.items():
        records = read_oasst(path)
        assert [r["tree_id"] for r in records] == ["t1", "t2", "t3"], name
        # Only the first turn: the follow-up prompt and its answer are not replies to the first prompt.
        assert {r["message_id"] for r in records[0]["replies"]} == {"a11", "a12", "a14", "a15"}, name
        kept, _ = filter_records(records)
        outputs[name] = (to_ift(kept), to_eft_eval(kept))
    for name, (ift, eft) in outputs.items():
        assert ift == EXPECTED_IFT, name
        assert eft == EXPECTED_EFT, name


def test_filter_counts_and_options(oasst_files):
    records = read_oasst(oasst_files["trees"])
    kept, counts = filter_records(records)
    assert [r["tree_id"] for r in kept] == ["t1", "t2"]
    assert {k: v for k, v in counts.items() if v} == {"prompt_lang": 1, "reply_deleted": 1, "reply_review": 1,
                                                      "reply_lang": 1}
    # The input is left as it was: filtering returns new records.
    assert len(records[0]["replies"]) == 4

    everything, counts = filter_records(records, lang=None, drop_deleted=False, require_review=False)
    assert not any(counts.values())
    assert sum(len(r["replies"]) for r in everything) == 10
    spanish, _ = filter_records(records, lang="es")
    assert to_ift(spanish) == [{"instruction": "¿Cuál es la capital de Perú?",
                                "response": "La capital de Perú es Lima."}]


def test_ift_takes_rank_zero_and_eft_needs_two_ranked(tmp_path):
    prompts = [
        msg("p1", "Q1", "prompter", replies=[msg("a", "second", "assistant", rank=1),
                                             msg("b", "first", "assistant", rank=0)]),
        msg("p2", "Q2", "prompter", replies=[msg("c", "only ranked", "assistant", rank=0),
                                             msg("d", "unranked", "assistant", rank=None)]),
        msg("p3", "Q3", "prompter", replies=[msg("e", "x", "assistant", rank=1),
                                             msg("f", "y", "assistant", rank=None)]),
    ]
    records = read_oasst(write_lines(tmp_path / "t.jsonl", [{"message_tree_id": p["message_id"], "prompt": p}
                                                            for p in prompts]))
    assert to_ift(records) == [{"instruction": "Q1", "response": "first"},
                               {"instruction": "Q2", "response": "only ranked"}]
    assert to_eft_eval(records) == [{"instruction": "Q1", "tree_id": "p1",
                                     "responses": [{"text": "first", "rank": 0}, {"text": "second", "rank": 1}]}]


def test_import_writes_files_the_project_reads(oasst_files, tmp_path):
    out = tmp_path / "out"
    counts = import_oasst(oasst_files["parquet"], out)
    assert counts["prompts_read"] == 3 and counts["prompts_kept"] == 2
    assert counts["ift_rows"] == 1 and counts["eft_rows"] == 2
    assert counts["dropped"]["prompt_lang"] == 1
    assert read_ift(out / "ift.jsonl") == EXPECTED_IFT
    groups = load_eval_set(out / "eft_eval.jsonl")
    assert [g.preference for g in groups] == [[0.0, -1.0], [-1.0, -2.0]]
    assert not list(out.glob(".*tmp"))  # the atomic write left no temp file behind

    with pytest.raises(SelfRewardError, match="none of 3 prompts passed the filters"):
        import_oasst(oasst_files["trees"], tmp_path / "none", lang=("de",))


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TREES[0]) + "\n{not json\n")
    with pytest.raises(SelfRewardError, match=r"bad\.jsonl:2: malformed JSON"):
        read_oasst(bad)

    unknown = write_lines(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(SelfRewardError, match=r"unknown OpenAssistant format.*found keys: answer, question"):
        read_oasst(unknown)

    rows = flatten(TREES)
    del rows[2]["text"]
    flat = write_lines(tmp_path / "flat.jsonl", rows)
    with pytest.raises(SelfRewardError, match=r"flat\.jsonl:3: missing field 'text'"):
        read_oasst(flat)

    rows = flatten(TREES)
    rows[4]["rank"] = "best"
    with pytest.raises(SelfRewardError, match=r"flat\.jsonl:5: .*rank 'best'"):
        read_oasst(write_lines(tmp_path / "flat.jsonl", rows))

    with pytest.raises(SelfRewardError, match="not found"):
        read_oasst(tmp_path / "missing.jsonl")

    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(SelfRewardError, match="cannot read as Parquet"):
        read_oasst(not_parquet)


# --- make_eft ---

class CountingJudge(LLMJudge):
    calls = 0

    def judge_groups(self, groups, samples, seed):
        self.calls += 1
        return super().judge_groups(groups, samples, seed)


def judge(outputs):
    return CountingJudge(ScriptedEngine(outputs), Sampling(0.7, 0.9, 64, 0), "additive", "scripted",
                         load_template("additive_judge"))


GROUPS = [
    {"instruction": "Agreeing prompt", "responses": [{"text": "best", "rank": 0}, {"text": "middle", "rank": 1},
                                                     {"text": "worst", "rank": 2}]},
    {"instruction": "Disagreeing prompt", "responses": [{"text": "good", "rank": 0}, {"text": "bad", "rank": 1}]},
    {"instruction": "Unparsed prompt", "responses": [{"text": "fine", "rank": 0}, {"text": "poor", "rank": 1}]},
]
OUTPUTS = [
    # Agreeing: 5 > 3 > 1. The first has a draft score line that must not reach the justification.
    "Draft Score: 4\nThe response is precise, complete and tailored to the question.\nScore: 5",
    "It answers the core of the question but leaves gaps. Score: 3",
    "It is related to the question and little more.\n**Score:** 1",
    # Disagreeing: the human-worse reply scores higher.
    "Vague. Score: 2",
    "Thorough. Score: 4",
    # One reply of this prompt has no score at all.
    "I cannot decide on this one.",
    "Partly useful. Score: 2",
]


def test_make_eft_keeps_only_agreeing_prompts():
    j = judge(OUTPUTS)
    rows, stats = make_eft(GROUPS, j, max_share=None)
    assert j.calls == 1
    assert [(r["instruction"], r["response"], r["score"]) for r in rows] == [
        ("Agreeing prompt", "best", 5), ("Agreeing prompt", "middle", 3), ("Agreeing prompt", "worst", 1)]
    assert all("score" not in r["justification"].lower() for r in rows)
    assert rows[0]["justification"] == "The response is precise, complete and tailored to the question."
    assert {k: stats[k] for k in ("prompts_judged", "agreeing", "disagreeing", "unscored", "rows_before",
                                  "rows_after")} == {"prompts_judged": 3, "agreeing": 1, "disagreeing": 1,
                                                     "unscored": 1, "rows_before": 3, "rows_after": 3}
    assert stats["scores_after"] == {1: 1, 3: 1, 5: 1}


def test_make_eft_ties_disagree_means_round_half_up_and_rows_round_trip(tmp_path):
    group = [{"instruction": "Q", "responses": [{"text": "a", "rank": 0}, {"text": "b", "rank": 1}]}]
    rows, stats = make_eft(group, judge(["Same. Score: 3"]), max_share=None)
    assert rows == [] and stats["disagreeing"] == 1
    # Two samples per reply: (3 + 4) / 2 = 3.5 rounds to 4; (1 + 2) / 2 = 1.5 rounds to 2.
    rows, _ = make_eft(group, judge(["Fair. Score: 3", "Good. Score: 4", "Weak. Score: 1", "Meh. Score: 2"]),
                       samples=2, max_share=None)
    assert [r["score"] for r in rows] == [4, 2]
    assert rows[0]["justification"] == "Fair."  # the first parsed sample's rationale
    assert read_eft(write_eft(tmp_path / "eft.jsonl", rows)) == rows


def test_justification_is_trimmed_to_100_words():
    text = " ".join(f"w{i}" for i in range(150)) + "\nScore: 3"
    assert justification(text).split() == [f"w{i}" for i in range(100)]


def test_downsampling_caps_the_dominant_score():
    # Twelve prompts whose better reply scores 4, the other cycling 0..3: score 4 is half the rows.
    groups = [{"instruction": f"Q{i}", "responses": [{"text": f"good {i}", "rank": 0},
                                                     {"text": f"weak {i}", "rank": 1}]} for i in range(12)]
    outputs = [o for i in range(12) for o in ("Solid. Score: 4", f"Lacking. Score: {i % 4}")]
    rows, stats = make_eft(groups, judge(outputs), max_share=0.4, rng_seed=7)
    assert stats["rows_before"] == 24 and stats["scores_before"][4] == 12
    # 8 of 20 is the most score 4 can keep at 40%; no other score is touched.
    assert stats["scores_after"] == {0: 3, 1: 3, 2: 3, 3: 3, 4: 8}
    assert stats["rows_after"] == len(rows) == 20
    assert max(stats["scores_after"].values()) / len(rows) <= 0.4
    again, _ = make_eft(groups, judge(outputs), max_share=0.4, rng_seed=7)
    assert again == rows


def test_downsample_edge_cases():
    rows = [{"score": 4}] * 5 + [{"score": 2}] * 5 + [{"score": 1}]
    kept, share = downsample(rows, 0.4)
    counts = {s: sum(r["score"] == s for r in kept) for s in (1, 2, 4)}
    assert counts == {1: 1, 2: 2, 4: 2} and share == 0.4
    # A single score can't be capped below 100% without emptying it: nothing is dropped.
    kept, share = downsample([{"score": 4}] * 6, 0.4)
    assert len(kept) == 6 and share == 1.0
    with pytest.raises(SelfRewardError, match="max_share"):
        downsample(rows, 0)
