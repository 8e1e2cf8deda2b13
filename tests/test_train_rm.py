"""`selfreward train-rm`: a reward model trained from a run's kept pairs or a ranked file,
recorded with its provenance and usable at once as the `reward-model` judge."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import write_jsonl
from selfreward.backends.models import weights_sha
from selfreward.cli import cli
from selfreward.core.store import Run

# Held-out and ranked data: several responses per prompt, ranked differently.
RANKED = [{"instruction": f"Explain how a {w} works", "tree_id": w,
           "responses": [{"text": f"A {w} uses water and energy to answer the question.", "rank": 0},
                         {"text": f"the {w} is good", "rank": 1},
                         {"text": "bad", "rank": 2}]} for w in ("pump", "lever", "kettle", "compass")]
FAST = ["--epochs", "2", "--lr", "5e-3", "--batch-size", "2"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def summary(result) -> str:
    """The command's last line (progress bars share the captured output, ending in carriage returns)."""
    return result.output.strip().splitlines()[-1].strip()


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_model) -> Path:
    """A two-round run (tiny model, scripted judge) with kept pairs in round 2, made once."""
    root = tmp_path_factory.mktemp("rm-run")
    ift = write_jsonl(root / "ift.jsonl", [{"instruction": f"Explain how a {w} works in three short sentences",
                                            "response": f"A {w} works well."}
                                           for w in ("pump", "lever", "kettle", "bicycle", "compass", "sundial")])
    eft = write_jsonl(root / "eft.jsonl", [{"instruction": f"Name one use of {w}", "response": f"{w} is used.",
                                            "justification": "Relevant but vague, one point.", "score": s}
                                           for s, w in enumerate(("salt", "sand", "steam", "copper", "glass"))])
    script = root / "judge.json"
    script.write_text(json.dumps(["Fine. Score: 4", "Weak. Score: 1", "Mostly there.\nScore: 3", "Score: 5"]))
    result = invoke("iterate", "--runs-dir", root / "runs", "--name", "r", "--model", tiny_model, "--ift", ift,
                    "--eft", eft, "--eft-eval", "", "--preset", "tiny", "--judge", "scripted", "--judge-script",
                    script, "--rounds", "2", "--set", "prompts_per_round=3", "--set", "n_candidates=3")
    assert result.exit_code == 0, result.output
    return root / "runs" / "r"


@pytest.fixture
def run_dir(two_rounds, tmp_path) -> Path:
    """A copy of the two-round run that the test may write to."""
    return Path(shutil.copytree(two_rounds, tmp_path / "runs" / "r"))


def test_reward_model_from_kept_pairs(run_dir, tmp_path):
    held_out = write_jsonl(tmp_path / "held.jsonl", RANKED)
    with Run.open(run_dir) as run:
        kept = run.db["pairs"].count_where("status = 'kept'")
        base_path = Path(run.model("M2")["path"])
    assert kept, "the scripted judge should yield kept pairs in round 2"
    base_sha = weights_sha(base_path)

    result = invoke("train-rm", run_dir, "--held-out", held_out, *FAST)
    assert result.exit_code == 0, result.output
    out = run_dir / "models" / "RM2"
    line = summary(result)
    assert line.startswith(f"RM2 (from M2): {kept} pairs,") and "held-out pairwise accuracy" in line
    assert line.endswith(str(out))

    # The base on disk is untouched; the new folder is a full model beside it, with its adapter.
    assert weights_sha(base_path) == base_sha
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.parent.glob(".*work")) and not list(out.parent.glob("*.tmp"))

    # Provenance: a models row like every model's, with the hash of what is on disk.
    with Run.open(run_dir) as run:
        row = run.rows("select * from models where name = 'RM2'")[0]
        steps = run.rows("select * from training_steps where kind = 'reward' order by step")
        evals = {r["name"]: r["value"] for r in run.rows("select * from eval_metrics where model = 'RM2'")}
        judge_names = {r["judge"] for r in run.rows("select judge from eval_metrics where model = 'RM2'")}
    assert row["kind"] == "reward-model" and row["parent"] == "M2" and row["round"] == 2
    assert row["path"] == "models/RM2" and row["adapter_path"] == "models/RM2/adapter"
    assert row["sha256"] == weights_sha(out)
    assert f"{kept} kept pairs of round 2" in row["note"]
    detail = json.loads(row["detail"])
    assert detail["pairs"] == kept and detail["steps"] == len(steps) and 0 <= detail["train_accuracy"] <= 1

    # Its steps: finite losses, RewardTrainer's accuracy and margin in the common columns, the model named.
    assert steps and all(r["model"] == "RM2" and r["round"] == 2 for r in steps)
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["rewards_accuracy"] is not None and r["rewards_margin"] is not None for r in steps)
    assert "mean_reward" in json.loads(steps[0]["metrics"])

    # Its held-out Table-4 metrics, stored under its name.
    assert judge_names == {f"reward-model:{out}"}
    assert evals["n_prompts"] == len(RANKED) and evals["parse_rate"] == 1.0 and "pairwise_accuracy" in evals

    # The score head and the LoRA adapter trained; the merged body carries the update.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    merged = load_file(out / "model.safetensors")
    head = [v for k, v in adapter.items() if k.endswith("score.weight")]
    assert len(head) == 1 and torch.equal(head[0], merged["score.weight"])
    from transformers import set_seed

    from selfreward.training.train_rm import load_classifier

    with Run.open(run_dir) as run:
        set_seed(run.config().seed)
    fresh = load_classifier(str(base_path)).score.weight.detach()  # the head as training began
    assert not torch.allclose(fresh, merged["score.weight"])
    base = load_file(base_path / "model.safetensors")
    assert any(not torch.equal(base[k], merged[k]) for k in merged if k in base and "layers" in k)

    # A judge at once: the reward-model judge loads the folder and scores pairs.
    from selfreward.backends.judges import Group
    from selfreward.backends.judges.reward_model import RewardModelJudge

    judge = RewardModelJudge(str(out))
    results = judge.judge_groups([Group(g["instruction"], [r["text"] for r in g["responses"]]) for g in RANKED],
                                 1, 0)
    scores = [v[0].parsed.score for r in results for v in r.verdicts]
    assert len(scores) == 12 and all(isinstance(s, float) and math.isfinite(s) for s in scores)

    # The rest of the CLI reads a run with a reward model: verify hashes it, status lists rounds,
    # eval commands that want a policy say what it is instead.
    verified = invoke("verify", run_dir)
    assert verified.exit_code == 0, verified.output
    assert invoke("status", run_dir).exit_code == 0
    report = invoke("report", run_dir)
    assert report.exit_code == 0, report.output
    assert "reward-model" in (run_dir / "report" / "report.html").read_text()
    refused = invoke("eval", "head2head", run_dir, "--a", "M1", "--b", "RM2")
    assert refused.exit_code != 0 and "RM2 is a reward model, not a policy" in refused.output
    again = invoke("train-rm", run_dir, "--name", "RM2", *FAST)
    assert again.exit_code != 0 and "already has a model RM2" in again.output


def test_reward_model_from_a_ranked_file_and_changed_weights_are_caught(run_dir, tmp_path):
    ranked = write_jsonl(tmp_path / "ranked.jsonl", RANKED)
    result = invoke("train-rm", run_dir, "--from", ranked, "--base", "M1", "--name", "rm-ranked", *FAST)
    assert result.exit_code == 0, result.output
    # The run has no eft_eval (''), so nothing was evaluated.
    assert summary(result).startswith("rm-ranked (from M1): 12 pairs,")
    assert "no held-out data" in result.output
    with Run.open(run_dir) as run:
        row = run.rows("select * from models where name = 'rm-ranked'")[0]
        assert run.db["eval_metrics"].count == 0
        assert run.db["training_steps"].count_where("model = 'rm-ranked'") > 0
    assert row["parent"] == "M1" and row["round"] == 1 and "12 ranked pairs from ranked.jsonl" in row["note"]
    # Three ranks per prompt: 3 pairs each, the better one always chosen; the trained model agrees on most.
    assert json.loads(row["detail"])["train_accuracy"] >= 0.75

    # The default name takes the next free one.
    second = invoke("train-rm", run_dir, "--from", ranked, "--base", "M1", "--epochs", "0.5")
    assert second.exit_code == 0, second.output
    assert summary(second).startswith("RM1 (from M1)")

    # verify checks a reward model's weights like any model's.
    weights = run_dir / "models" / "rm-ranked" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    bad = invoke("verify", run_dir)
    assert bad.exit_code == 1 and "model rm-ranked" in bad.output and "has changed" in bad.output


@pytest.mark.parametrize("case, args, message", [
    ("no pairs", [], "has no kept preference pairs"),
    ("missing file", ["--from", "nope.jsonl"], "training data not found: nope.jsonl"),
    ("unknown base", ["--base", "M7"], "model M7 is not in run"),
    ("policy name", ["--name", "M2"], "M2 is how the loop names its policy models"),
    ("missing held-out", ["--held-out", "nope.jsonl"], "evaluation set not found: nope.jsonl"),
    ("unknown run", None, "no run at"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model, case, args, message):
    from selfreward.config import resolve

    # A run with only its base model: no pairs yet.
    run = Run.create(tmp_path / "runs" / "empty", resolve({}, {"preset": "tiny", "eft_eval": ""}))
    run.db["models"].insert({"name": "M0", "round": 0, "kind": "base", "parent": None, "path": str(tiny_model),
                             "adapter_path": None, "note": None, "created_at": "2025-01-01T00:00:00+00:00",
                             "sha256": weights_sha(tiny_model)})
    run.close()
    target = ["nope", "--runs-dir", tmp_path / "runs"] if args is None else [tmp_path / "runs" / "empty", *args]
    result = invoke("train-rm", *target)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    with Run.open(tmp_path / "runs" / "empty") as run:
        assert [r["name"] for r in run.rows("select name from models")] == ["M0"]
        assert run.db["training_steps"].count == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "empty" / "models").iterdir()) == []
