"""Logprob-weighted scores (G-Eval): the probabilities of the score tokens 0..5 read after
the judge's rationale, their expected value beside the parsed score, and pairs built
from either."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from selfreward.backends.engines import SCORE_CHOICES, Sampling
from selfreward.backends.engines.hf import TransformersEngine
from selfreward.backends.judges import Group
from selfreward.backends.judges.llm import LLMJudge, expected_score
from selfreward.backends.judges.scripted import ScriptedEngine
from selfreward.cli import cli
from selfreward.core.store import Run
from selfreward.errors import SelfRewardError
from selfreward.prompts import parse_additive

SAMPLING = Sampling(0.7, 0.9, 32, 0)


def test_expected_score_is_normalised_over_the_score_tokens():
    assert expected_score({"4": 0.3, "2": 0.1, "0": 0.0}) == pytest.approx(3.5)
    assert expected_score({"5": 0.2}) == 5.0
    assert expected_score({c: 0.0 for c in SCORE_CHOICES}) is None  # no probability on any score
    assert expected_score(None) is None


def test_parser_says_where_the_score_stands():
    for text in ("Fine.\nScore: 4", "Fine. **Score:** 4.", "- Score: 4/5", "Score:4 points"):
        parsed = parse_additive(text)
        assert parsed.score == 4 and text[parsed.at] == "4"
    assert parse_additive("Score: 9").at is None and parse_additive("no score").at is None


def test_transformers_engine_reads_score_probabilities(tiny_model):
    engine = TransformersEngine(str(tiny_model), batch_size=2)
    outputs = ["Helpful and right.\nScore: 4", "Off topic. Score: 1", "Score: 5"]
    prompts = [[{"role": "user", "content": f"Judge answer {k}"}] for k in range(3)]
    cuts = [parse_additive(o).at for o in outputs]
    batched = engine.choice_probs(prompts, outputs, cuts, SCORE_CHOICES)
    for i, probs in enumerate(batched):
        assert set(probs) == set(SCORE_CHOICES) and 0 < sum(probs.values()) <= 1 + 1e-6
        alone = engine.choice_probs(prompts[i:i + 1], outputs[i:i + 1], cuts[i:i + 1], SCORE_CHOICES)[0]
        # Left padding with position ids: a batch reads what each item reads alone.
        assert max(abs(alone[c] - probs[c]) for c in SCORE_CHOICES) < 1e-5
    # The prefix really is the rationale: another rationale gives another distribution.
    other = engine.choice_probs(prompts[:1], ["Wrong, unsafe, and rude.\nScore: 4"],
                                [parse_additive("Wrong, unsafe, and rude.\nScore: 4").at], SCORE_CHOICES)[0]
    assert other != batched[0]


def test_judge_stores_expected_beside_parsed_and_leaves_unparsed_unscored():
    script = [{"text": "Clear. Score: 4", "probs": {"4": 0.6, "5": 0.2, "3": 0.2}},
              "No score here.",
              {"text": "Score: 2", "probs": {"2": 1.0}},
              "Plain. Score: 3"]  # a plain string gives no probabilities
    judge = LLMJudge(ScriptedEngine(script), SAMPLING, logprobs=True)
    (result,) = judge.judge_groups([Group("q", ["a", "b"])], samples=2, seed=0)
    (v1, v2), (v3, v4) = result.verdicts
    assert (v1.parsed.score, v1.expected) == (4.0, pytest.approx(4.0))
    assert v1.probs == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.2, "4": 0.6, "5": 0.2}
    assert v2.parsed.score is None and v2.expected is None and v2.probs is None
    assert (v3.parsed.score, v3.expected) == (2.0, 2.0)
    assert v4.parsed.score == 3.0 and v4.expected is None
    plain = LLMJudge(ScriptedEngine(script), SAMPLING, logprobs=False)
    assert all(v.expected is None for vs in plain.judge_groups([Group("q", ["a"])], 1, 0)[0].verdicts for v in vs)


def test_scripted_judge_file_with_probabilities_is_checked(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "Score: 4", "probs": {"4": "high"}}]))
    with pytest.raises(SelfRewardError, match="JSON list of strings or of"):
        ScriptedEngine.from_file(str(bad))


@pytest.fixture
def prob_script(tmp_path):
    """Parsed scores that tie (4 and 4) while their probabilities do not."""
    outputs = [{"text": "Good. Score: 4", "probs": {"4": 0.5, "5": 0.5}},
               {"text": "Good. Score: 4", "probs": {"4": 0.5, "3": 0.5}},
               {"text": "Weak.\nScore: 2", "probs": {"2": 0.9, "1": 0.1}},
               "Cannot judge."]
    path = tmp_path / "judge.json"
    path.write_text(json.dumps(outputs))
    return path


def test_loop_builds_pairs_from_expected_scores(tmp_path, tiny_model, seed_files, prob_script):
    runs = tmp_path / "runs"
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"instruction": f"Describe {w}", "response": f"{w} answer {s}",
                                           "justification": "j", "score": s}) + "\n"
                               for w in ("tides", "rust") for s in (1, 3, 5)))
    args = ["iterate", "--runs-dir", str(runs), "--name", "e", "--model", str(tiny_model), "--ift",
            str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", str(heldout),
            "--preset", "tiny", "--judge", "scripted", "--judge-script", str(prob_script), "--rounds", "2",
            "--set", "prompts_per_round=3", "--set", "n_candidates=3", "--set", "judge_samples=2",
            "--set", "pair_score=expected"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = Run.open(runs / "e")
    judgments = run.rows("select * from judgments where round = 2")
    for j in judgments:
        if j["score"] is None:
            assert j["expected_score"] is None and j["score_probs"] is None
        elif j["raw"].startswith("Good") or j["raw"].startswith("Weak"):
            assert j["expected_score"] == pytest.approx(expected_score(json.loads(j["score_probs"])))
    pairs = run.rows("select * from pairs where round = 2")
    assert pairs and {p["score_kind"] for p in pairs} == {"expected"}
    by_id = {}
    for j in judgments:
        if j["score"] is not None and j["expected_score"] is not None:
            by_id.setdefault(j["candidate_id"], []).append(j["expected_score"])
    for p in pairs:
        if p["status"] == "kept":
            assert p["chosen_score"] == pytest.approx(sum(by_id[p["chosen_id"]]) / len(by_id[p["chosen_id"]]))
    # The eval stage reports the expected scores' metrics beside the parsed ones.
    names = {r["name"] for r in run.rows("select name from metrics where model = 'M2'")}
    assert {"eft_pairwise_accuracy", "eft_expected_pairwise_accuracy", "eft_expected_pairwise_ties",
            "eft_expected_coverage"} <= names
    verify = CliRunner().invoke(cli, ["verify", str(runs / "e")])
    assert verify.exit_code == 0, verify.output


def test_pair_score_expected_needs_a_judge_that_reads_probabilities(tmp_path, tiny_model, seed_files):
    result = CliRunner().invoke(cli, ["iterate", "--runs-dir", str(tmp_path / "runs"), "--model", str(tiny_model),
                                      "--ift", str(seed_files["ift"]), "--eft", str(seed_files["eft"]),
                                      "--preset", "tiny", "--set", "pair_score=expected",
                                      "--set", "judge_logprobs=no"])
    assert result.exit_code != 0 and "pair_score 'expected' needs score probabilities" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
