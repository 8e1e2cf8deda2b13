"""PairRM judge on a tiny random checkpoint written in the real on-disk layout
(config.json with PairRM's extra keys, model.safetensors, a saved tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfreward.errors import SelfRewardError
from selfreward.backends.judges import Group
from selfreward.backends.judges.pairrm import (PREFIXES, PairRMJudge, build_module, encode_pair, load_pairrm,
                                      margin_scores, outcome, pair_logits)

WORDS = "the a water plant city music code data small large fast slow good bad answer question explain".split()


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import DebertaV2Config, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.add_special_tokens(list(PREFIXES.values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]")
    ids = {key: fast.convert_tokens_to_ids(token) for key, token in PREFIXES.items()}
    # DeBERTa-v3's attention settings, so the relative-position path PairRM uses is the one tested.
    config = DebertaV2Config(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=512, relative_attention=True,
                             pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
                             position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0,
                             pad_token_id=0, n_tasks=1, drop_out=0.05, **ids)
    torch.manual_seed(seed)
    model = build_module(config)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pairrm") / "PairRM-tiny")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pairrm(str(checkpoint))


GROUP = Group("explain the water plant", ["good answer", "bad small answer", "the city music code", "fast"])


def test_loads_and_scores_pairs_with_one_marker_each(loaded):
    model, tokenizer = loaded
    ids = [encode_pair(tokenizer, GROUP.instruction, a, b) for a, b in
           [(GROUP.responses[0], GROUP.responses[1]), ("<|candidate2|> data", "x <|source|>")]]
    for row in ids:
        for key in PREFIXES:
            assert row.count(getattr(model.config, key)) == (key != "cand_prefix_id")
        assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
    logits = pair_logits(model, tokenizer, ids)
    assert len(logits) == 2 and all(isinstance(x, float) for x in logits)


def test_scores_are_the_mean_margin_of_the_pair_logits(loaded, checkpoint):
    model, tokenizer = loaded
    result = PairRMJudge(str(checkpoint)).judge_groups([GROUP], samples=3, seed=0)[0]
    n = len(GROUP.responses)
    # Recomputed one pair at a time (no padding), so batching must not change a logit.
    m = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                ids = encode_pair(tokenizer, GROUP.instruction, GROUP.responses[i], GROUP.responses[j])
                m[i][j] = pair_logits(model, tokenizer, [ids])[0]
    assert [len(v) for v in result.verdicts] == [1] * n
    scores = [v[0].parsed.score for v in result.verdicts]
    expected = [sum(m[i][j] - m[j][i] for j in range(n) if j != i) / (n - 1) for i in range(n)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert sum(scores) == pytest.approx(0.0, abs=1e-4)
    assert result.verdicts[0][0].raw is None and "3 opponents" in result.verdicts[0][0].parsed.rationale
    assert len(result.comparisons) == n * (n - 1) // 2
    for c in result.comparisons:
        assert c.a < c.b and c.sample == 0
        assert c.ab.parsed.score == pytest.approx(m[c.a][c.b], abs=1e-4)
        assert c.ba.parsed.score == pytest.approx(m[c.b][c.a], abs=1e-4)
        assert c.outcome == outcome(c.ab.parsed.score, c.ba.parsed.score)


def test_swapping_the_responses_swaps_the_scores(checkpoint):
    judge = PairRMJudge(str(checkpoint))
    forward, backward = judge.judge_groups([Group("explain code", ["good data", "bad slow code"]),
                                            Group("explain code", ["bad slow code", "good data"])], 1, 0)
    a, b = (v[0].parsed.score for v in forward.verdicts)
    b2, a2 = (v[0].parsed.score for v in backward.verdicts)
    assert a == pytest.approx(-b) and a == pytest.approx(a2, abs=1e-5) and b == pytest.approx(b2, abs=1e-5)


def test_margin_and_outcome_formulas():
    assert margin_scores([[0, 2.0, -1.0], [1.0, 0, 0.5], [3.0, -2.0, 0]]) == [(1.0 - 4.0) / 2, (-1.0 + 2.5) / 2,
                                                                              (4.0 - 2.5) / 2]
    assert outcome(1.5, -0.5) == "a" and outcome(-1.0, 2.0) == "b" and outcome(0.0, 0.0) == "tie"
    assert outcome(1.0, 0.3) == "inconsistent" and outcome(-1.0, -0.3) == "inconsistent"


def test_group_of_one_gets_no_score(checkpoint):
    result = PairRMJudge(str(checkpoint)).judge_groups([Group("explain", ["only one"])], 1, 0)[0]
    assert result.verdicts[0][0].parsed.score is None
    assert "at least two" in result.verdicts[0][0].parsed.reason
    assert result.comparisons == []


def test_missing_head_weight_is_refused(checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    state = load_file(broken / "model.safetensors")
    del state["head_layer.4.bias"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(SelfRewardError, match=r"missing \['head_layer.4.bias'\]"):
        load_pairrm(str(broken))


def test_non_pairrm_config_is_refused(checkpoint, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    raw = json.loads((other / "config.json").read_text())
    del raw["cand1_prefix_id"]
    (other / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SelfRewardError, match="not a PairRM checkpoint.*missing cand1_prefix_id"):
        load_pairrm(str(other))


def test_missing_folder_and_unreachable_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(SelfRewardError, match="not found"):
        load_pairrm(str(tmp_path / "nope"))
    # Offline, so that the test never downloads even where the hub is reachable.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    unreachable = "'selfreward-tests/no-such-pairrm' is not a local folder or .gguf file, and the hub could not"
    with pytest.raises(SelfRewardError, match=unreachable):
        load_pairrm("selfreward-tests/no-such-pairrm")
    # Building the judge loads nothing; the error comes at the first judging.
    judge = PairRMJudge("selfreward-tests/no-such-pairrm")
    assert judge.name == "pairrm:selfreward-tests/no-such-pairrm" and judge.template_sha is None
    with pytest.raises(SelfRewardError, match=unreachable):
        judge.judge_groups([GROUP], 1, 0)
