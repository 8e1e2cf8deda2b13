"""Training methods on tiny fixture models: QLoRA on CPU (4-bit base, merge into full
precision), DPO's loss types and LD-DPO, reference-free SimPO, experiment tracking,
and each method through the real CLI loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sqlite_utils
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from selfreward.cli import cli
from selfreward.config import resolve
from selfreward.training.recipes import preference
from conftest import build_tiny_model
from test_lora import folder_hash

PAIRS = [{"prompt": f"say {w}", "chosen": f"{w} answer good", "rejected": "bad bad bad"}
         for w in ("water", "energy", "city", "music")]
FAST = {"preset": "tiny", "dpo_epochs": 2.0, "dpo_learning_rate": 1e-2, "dpo_learning_rate_end": 1e-3}


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory) -> Path:
    """Hidden size 64: bitsandbytes' CPU kernel packs 4-bit weights in blocks of 64 inputs."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny64") / "model", hidden=64)


def train(model: Path, out: Path, heldout: str, **overrides):
    cfg = resolve({}, {**FAST, "eft_eval": heldout, **overrides})
    return preference(str(model), PAIRS, cfg, out, round=2)


def test_qlora_on_cpu_trains_a_4bit_base_and_merges_into_full_precision(tiny64, tmp_path, heldout):
    before = folder_hash(tiny64)
    parent = load_file(next(tiny64.glob("*.safetensors")))
    out = tmp_path / "runs" / "q" / "models" / "M2"
    rows, adapter, info = train(tiny64, out, heldout, load_in_4bit="yes")

    assert info["four_bit"] is True and info["method"] == "dpo"
    assert folder_hash(tiny64) == before  # the base on disk did not change
    lora_b = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the adapter moved
    merged = load_file(next(out.glob("*.safetensors")))
    # No quantized tensors and no quantization_config: merged into a full-precision reload of the base.
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert merged.keys() == parent.keys()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert any(not torch.equal(parent[k], merged[k]) for k in parent)  # it differs from its parent
    # The gap between 4-bit + adapter and the merged model on the held-out pairs: measured, and not nothing
    # (the 4-bit base rounds the weights that the merge keeps at full precision).
    assert info["merge_probe_pairs"] == 2 and 0 < info["merge_gap"] < 50
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_lora_merge_gap_is_rounding_only(tiny64, tmp_path, heldout):
    _, _, info = train(tiny64, tmp_path / "runs" / "l" / "models" / "M2", heldout, load_in_4bit="no",
                       train_precision="fp32")
    assert info["four_bit"] is False and info["merge_gap"] < 1e-3
    # A bf16 base trains against weights rounded to bf16; the merge keeps them at full precision.
    _, _, info = train(tiny64, tmp_path / "runs" / "b" / "models" / "M2", heldout, load_in_4bit="no",
                       train_precision="bf16")
    assert info["four_bit"] is False and 0 < info["merge_gap"] < 5


def test_dpo_records_its_pairs_margins_after_training_in_full_precision(tiny64, tmp_path, heldout):
    from selfreward.backends.models import load_model, load_tokenizer, sequence_logps
    from selfreward.training.fit import dpo_fit

    out = tmp_path / "runs" / "f" / "models" / "M2"
    _, _, info = train(tiny64, out, heldout, load_in_4bit="no", train_precision="bf16")
    # The merged model against its base on the trained pairs, recomputed here in fp32 from the folders.
    tok = load_tokenizer(str(tiny64))
    again = dpo_fit(sequence_logps(load_model(str(tiny64)), tok, PAIRS), sequence_logps(load_model(str(out)), tok, PAIRS),
                    0.1)
    assert info["fit_pairs"] == again["fit_pairs"] == len(PAIRS)
    assert info["fit_margin"] == pytest.approx(again["fit_margin"], abs=1e-5)
    assert info["fit_accuracy"] == again["fit_accuracy"]
    # At this learning rate two epochs separate every pair.
    assert info["fit_accuracy"] == 1.0 and info["fit_margin"] > 0


def test_dpo_fit_margins():
    from selfreward.training.fit import dpo_fit

    # Pair 1: chosen up 2 nats, rejected down 1: margin 0.1 * 3. Pair 2: chosen down 1, rejected unchanged.
    fit = dpo_fit([-10.0, -12.0, -5.0, -6.0], [-8.0, -13.0, -6.0, -6.0], 0.1)
    assert fit["fit_margin"] == pytest.approx((0.3 - 0.1) / 2) and fit["fit_accuracy"] == 0.5
    assert fit["fit_pairs"] == 2
    assert fit["fit_loss"] == pytest.approx((math.log1p(math.exp(-0.3)) + math.log1p(math.exp(0.1))) / 2)


@pytest.mark.parametrize("overrides, label, own_metric", [
    ({"dpo_loss_type": "sigmoid"}, "dpo", "rewards/margins"),
    ({"dpo_loss_type": "ipo"}, "dpo:ipo", "rewards/margins"),
    ({"dpo_loss_type": "robust", "dpo_label_smoothing": 0.1}, "dpo:robust", "rewards/margins"),
    ({"dpo_loss_type": "hinge"}, "dpo:hinge", "rewards/margins"),
    ({"dpo_loss_type": "sigmoid,sft"}, "dpo:sigmoid+sft", "rewards/margins"),
    ({"dpo_ld_alpha": 0.5}, "dpo ld=0.5", "rewards/margins"),
    ({"train_method": "simpo"}, "simpo", "nll_loss"),
])
def test_each_method_moves_the_weights_with_a_finite_loss(tiny_model, tmp_path, heldout, overrides, label,
                                                          own_metric):
    parent = load_file(next(tiny_model.glob("*.safetensors")))
    out = tmp_path / "runs" / "m" / "models" / "M2"
    rows, adapter, info = train(tiny_model, out, heldout, **overrides)
    merged = load_file(next(out.glob("*.safetensors")))
    assert any(not torch.equal(parent[k], merged[k]) for k in parent)
    assert info["label"] == label and info["steps"] == len(rows) > 0
    assert ("fit_margin" in info) == (overrides.get("train_method", "dpo") == "dpo")  # SimPO has no reference
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["kind"] == overrides.get("train_method", "dpo") for r in rows)
    logged = [json.loads(r["metrics"]) for r in rows]
    assert all(own_metric in m and math.isfinite(m[own_metric]) for m in logged)


def test_simpo_is_simpo_and_reference_free(tiny_model, tmp_path, monkeypatch):
    """cpo_alpha=0 (no behaviour-cloning term, which would make it CPO-SimPO) and no reference model."""
    from selfreward.training import fit as train_module

    built = {}
    real = train_module._train_and_merge

    def spy(trainer, *args, **kwargs):
        built.update(type=type(trainer).__name__, loss=trainer.args.loss_type, alpha=trainer.args.cpo_alpha,
                     beta=trainer.args.beta, gamma=trainer.args.simpo_gamma,
                     ref=getattr(trainer, "ref_model", None))
        return real(trainer, *args, **kwargs)

    cfg = resolve({}, {**FAST, "train_method": "simpo", "simpo_beta": 2.5, "simpo_gamma": 0.3, "eft_eval": ""})
    monkeypatch.setattr(train_module, "_train_and_merge", spy)
    preference(str(tiny_model), PAIRS, cfg, tmp_path / "runs" / "s" / "models" / "M2", round=2)
    assert built == {"type": "CPOTrainer", "loss": "simpo", "alpha": 0.0, "beta": 2.5, "gamma": 0.3, "ref": None}


def test_tensorboard_gets_each_trainer_run(tiny_model, tmp_path):
    out = tmp_path / "runs" / "tb" / "models" / "M2"
    cfg = resolve({}, {**FAST, "report_to": "tensorboard", "eft_eval": ""})
    preference(str(tiny_model), PAIRS, cfg, out, round=2)
    events = list((tmp_path / "runs" / "tb" / "tensorboard" / "M2").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert any("loss" in tag for tag in acc.Tags()["scalars"])
    assert not (out.parent / ".M2.work").exists()  # the trainer's scratch folder is gone; the logs are not


@pytest.mark.parametrize("setting, message", [
    ("train_method=ppo", "unknown train_method 'ppo'"),
    ("dpo_loss_type=sigmoid,nope", "unknown dpo_loss_type nope"),
    ("dpo_ld_alpha=1.5", "dpo_ld_alpha must lie in [0, 1]"),
    ("dpo_label_smoothing=0.5", "dpo_label_smoothing must lie in [0, 0.5)"),
    ("report_to=wandbx", "unknown report_to 'wandbx'"),
])
def test_bad_training_settings_fail_with_one_line(tmp_path, setting, message):
    result = CliRunner().invoke(cli, ["iterate", "--runs-dir", str(tmp_path), "--name", "bad", "--preset", "tiny",
                                      "--set", setting])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method, sets", [("dpo", ["dpo_loss_type=ipo"]), ("simpo", [])])
def test_each_method_completes_two_rounds_of_the_loop(tmp_path, tiny_model, seed_files, judge_script, method,
                                                      sets):
    runs = tmp_path / "runs"
    args = ["iterate", "--runs-dir", str(runs), "--name", "m", "--model", str(tiny_model), "--ift",
            str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "", "--preset", "tiny",
            "--judge", "scripted", "--judge-script", str(judge_script), "--rounds", "2", "--train-method", method,
            *[x for s in sets for x in ("--set", s)]]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    db = sqlite_utils.Database(runs / "m" / "run.db")
    m2 = db["models"].get("M2")
    if m2["kind"] == "copy":
        pytest.fail("the scripted judge gave round 2 no pairs to train on")
    assert m2["kind"] == f"{method}-lora"
    detail = json.loads(m2["detail"])
    assert detail["method"] == method and detail["steps"] > 0
    steps = list(db["training_steps"].rows_where("round = 2"))
    assert steps and all(s["kind"] == method and math.isfinite(s["loss"]) for s in steps)
    label = "dpo:ipo" if method == "dpo" else "simpo"
    assert label in result.output  # the summary's train column
    status = CliRunner().invoke(cli, ["status", "m", "--runs-dir", str(runs), "--json"])
    assert json.loads(status.output)["rounds"][1]["train"] == label


def test_judge_reward_averages_parsed_scores_and_gives_none_never_zero():
    """The online reward: the mean of a completion's parsed judge samples, None when none parsed."""
    from selfreward.backends.judges import Group, GroupResult, Verdict
    from selfreward.core.stages.rl import JudgeReward
    from selfreward.prompts import Parsed

    class Judge:
        name, template_sha = "fake", None

        def __init__(self):
            self.seen = []

        def judge_groups(self, groups: list[Group], samples: int, seed: int):
            self.seen.append([(g.instruction, list(g.responses)) for g in groups])
            scores = {"good": [4.0, 2.0], "odd": [None, 5.0], "mute": [None, None]}
            return [GroupResult([[Verdict(str(s), Parsed(s, "", None if s is not None else "no score"))
                                  for s in scores[r]] for r in g.responses]) for g in groups]

    judge = Judge()
    reward = JudgeReward(judge, 2, 0, "M1+grpo", max_tokens=3)
    completions = [[{"role": "assistant", "content": t}] for t in ("good", "odd", "mute", "good")]
    out = reward(prompts=[None] * 4, completions=completions, prompt_id=[7, 7, 9, 9],
                 instruction=["a", "a", "b", "b"], completion_ids=[[1], [1, 2, 3], [1], [1, 2]])
    assert out == [3.0, 5.0, None, 3.0]
    assert judge.seen == [[("a", ["good", "odd"]), ("b", ["mute", "good"])]]  # one group per prompt
    assert [c["finish_reason"] for c in reward.candidates] == ["stop", "length", "stop", "stop"]
    assert [len(v) for v in reward.verdicts] == [2, 2, 2, 2]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_rl_completes_two_rounds_and_stores_what_it_judged(tmp_path, tiny_model, seed_files, judge_script,
                                                                   method):
    runs = tmp_path / "runs"
    args = ["iterate", "--runs-dir", str(runs), "--name", "rl", "--model", str(tiny_model), "--ift",
            str(seed_files["ift"]), "--eft", str(seed_files["eft"]), "--eft-eval", "", "--preset", "tiny",
            "--judge", "scripted", "--judge-script", str(judge_script), "--rounds", "2", "--train-method", method]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    db = sqlite_utils.Database(runs / "rl" / "run.db")
    m1, m2 = db["models"].get("M1"), db["models"].get("M2")
    assert m2["kind"] == f"{method}-lora" and json.loads(m2["detail"])["method"] == method
    before = load_file(next((runs / "rl" / m1["path"]).glob("*.safetensors")))
    after = load_file(next((runs / "rl" / m2["path"]).glob("*.safetensors")))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved
    prompts = db["prompts"].count_where("round = 2")
    cands = list(db["candidates"].rows_where("round = 2"))
    assert prompts and len(cands) == prompts * 2  # n_candidates samples per prompt, stored as candidates
    assert all(c["model"].startswith(f"M1+{method}@") for c in cands)
    judgments = list(db["judgments"].rows_where("round = 2"))
    assert len(judgments) == len(cands) * 2 and {j["candidate_id"] for j in judgments} == {c["id"] for c in cands}
    assert all((j["score"] is None) == (j["reason"] is not None) for j in judgments)
    steps = list(db["training_steps"].rows_where("round = 2"))
    assert steps and all(s["kind"] == method and math.isfinite(s["loss"]) and s["kl"] is not None for s in steps)
    assert not db["pairs"].count_where("round = 2")  # online RL makes no pairs
    stages = {s["stage"] for s in db["stages"].rows_where("round = 2")}
    assert {"self_instruct", "rl"} <= stages and not {"candidates", "judge", "pairs", "dpo"} & stages
    verify = CliRunner().invoke(cli, ["verify", "rl", "--runs-dir", str(runs)])
    assert verify.exit_code == 0, verify.output
