"""Reward-model judge on tiny Llama sequence classifiers (1, 2 and 3 labels),
saved to folders and loaded by path, with the tokenizer of the shared tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfreward.errors import SelfRewardError
from selfreward.backends.judges import Group
from selfreward.backends.judges.reward_model import RewardModelJudge, encode, load_reward_model

GROUPS = [Group("explain how a plant works", ["the plant uses water and energy", "bad", "a small list of data"]),
          Group("write code", ["the code is fast", "why"])]


def write_classifier(tiny_model: Path, path: Path, num_labels: int, chat: bool = True, **config) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if not chat:
        tokenizer.chat_template = None
    torch.manual_seed(num_labels)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=tokenizer.pad_token_id, num_labels=num_labels, **config)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rm")
    return {"reward": write_classifier(tiny_model, root / "reward", 1),
            "binary": write_classifier(tiny_model, root / "binary", 2, chat=False,
                                       id2label={0: "NEGATIVE", 1: "POSITIVE"}),
            "flipped": write_classifier(tiny_model, root / "flipped", 2, id2label={0: "positive", 1: "negative"}),
            "three": write_classifier(tiny_model, root / "three", 3)}


def scores(results) -> list[float]:
    return [v[0].parsed.score for r in results for v in r.verdicts]


def test_reward_logit_one_verdict_per_response_deterministic(models):
    judge = RewardModelJudge(str(models["reward"]))
    assert judge.name == f"reward-model:{models['reward']}" and judge.template_sha is None
    first = judge.judge_groups(GROUPS, samples=3, seed=0)
    assert [[len(v) for v in r.verdicts] for r in first] == [[1, 1, 1], [1, 1]]
    v = first[0].verdicts[0][0]
    assert v.raw is None and v.parsed.reason is None and v.parsed.rationale == "reward model logit"
    assert all(isinstance(s, float) for s in scores(first))
    assert scores(judge.judge_groups(GROUPS, samples=3, seed=7)) == pytest.approx(scores(first), abs=1e-5)


def test_batched_scores_match_one_at_a_time(models):
    import torch

    model, tokenizer = load_reward_model(str(models["reward"]))
    batched = scores(RewardModelJudge(str(models["reward"]), batch_size=8).judge_groups(GROUPS, 1, 0))
    single = []
    for g in GROUPS:
        for r in g.responses:
            enc = encode(tokenizer, g.instruction, r)
            assert "<|im_start|>" in tokenizer.decode(enc["input_ids"])  # the chat template was applied
            with torch.inference_mode():
                single.append(model(**tokenizer.pad([enc], return_tensors="pt")).logits[0, 0].item())
    assert batched == pytest.approx(single, abs=1e-4)


@pytest.mark.parametrize("name, positive", [("binary", 1), ("flipped", 0)])
def test_two_labels_give_the_positive_probability(models, name, positive):
    import torch

    model, tokenizer = load_reward_model(str(models[name]))
    judge = RewardModelJudge(str(models[name]))
    got = scores(judge.judge_groups(GROUPS, 1, 0))
    expected = []
    for g in GROUPS:
        enc = tokenizer([g.instruction] * len(g.responses), g.responses, padding=True, return_tensors="pt") \
            if name == "binary" else tokenizer.pad([encode(tokenizer, g.instruction, r) for r in g.responses],
                                                   return_tensors="pt")
        with torch.inference_mode():
            expected += model(**enc).logits.softmax(-1)[:, positive].tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in got)
    label = "POSITIVE" if name == "binary" else "positive"
    assert judge.judge_groups(GROUPS[:1], 1, 0)[0].verdicts[0][0].parsed.rationale == f"reward model P({label})"


def test_three_labels_are_refused(models):
    with pytest.raises(SelfRewardError, match="3 labels; supported are 1"):
        RewardModelJudge(str(models["three"])).judge_groups(GROUPS, 1, 0)


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(SelfRewardError, match="not found"):
        load_reward_model(str(tmp_path / "nope"))
    # Offline: an unreachable hub then fails at once instead of after retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SelfRewardError, match="'selfreward-tests/no-such-rm' is not a local folder or .gguf file, and the hub could not"):
        load_reward_model("selfreward-tests/no-such-rm")
