"""PairRM (llm-blender/PairRM-hf): a DeBERTa-v3 pairwise reward model.

It reads `<|source|>prompt <|candidate1|>A <|candidate2|>B` and gives a logit for
"A is better than B". Every ordered pair of a prompt's responses is scored, in
both orders, and a response's score is its mean logit margin over its opponents:
score_i = mean_{j != i} (M[i, j] - M[j, i]), M[i, j] = logit(i > j).

The module is written here (the llm-blender package is not needed): its
attribute names match the checkpoint's state_dict, which is loaded strictly.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

from selfreward.errors import SelfRewardError
from selfreward.backends.judges.base import Comparison, Group, GroupResult, LocalModelJudge, Verdict
from selfreward.backends.models import device, resolve_source
from selfreward.prompts import Parsed

PREFIXES = {"source_prefix_id": "<|source|>", "cand1_prefix_id": "<|candidate1|>",
            "cand2_prefix_id": "<|candidate2|>", "cand_prefix_id": "<|candidate|>"}
EXTRA_KEYS = (*PREFIXES, "n_tasks", "drop_out")
# The lengths of the model card: 1224 for the prompt, the rest of 2048 split between the candidates.
SOURCE_MAX, TOTAL_MAX = 1224, 2048
HUB_FILES = ["*.json", "*.model", "*.txt", "model.safetensors"]


def build_module(config):
    """A PairRM module with random weights for a DebertaV2Config carrying PairRM's extra keys."""
    # The class lives in here so that importing this file does not import torch.
    import torch
    from torch import nn
    from transformers import DebertaV2Model

    class PairRMModel(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.pretrained_model = DebertaV2Model(config)
            h = config.hidden_size
            self.head_layer = nn.Sequential(nn.Dropout(config.drop_out), nn.Linear(2 * h, h), nn.Tanh(),
                                            nn.Dropout(config.drop_out), nn.Linear(h, config.n_tasks))

        def forward(self, input_ids, attention_mask):
            """logit(A > B) per row, shape [batch]."""
            hidden = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            src, c1, c2 = (self._at(hidden, input_ids, getattr(self.config, k))
                           for k in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id"))
            left = self.head_layer(torch.cat([src, c1], dim=-1))
            right = self.head_layer(torch.cat([src, c2], dim=-1))
            return (left - right).mean(-1)

        @staticmethod
        def _at(hidden, input_ids, token_id):
            # encode_pair puts each prefix exactly once per row (it strips them from the texts).
            pos = (input_ids == token_id).int().argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]

    return PairRMModel(config)


def _folder(source: str) -> Path:
    path = resolve_source(source)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = Path(snapshot_download(source, allow_patterns=HUB_FILES))
        if not (folder / "model.safetensors").is_file():
            hf_hub_download(source, "pytorch_model.bin")  # lands in the same snapshot folder
    except (OSError, HFValidationError) as e:
        raise SelfRewardError(f"cannot get PairRM '{source}' from the Hugging Face hub "
                              f"({str(e).splitlines()[0]}); download it and pass its local folder") from None
    return folder


def _state_dict(folder: Path) -> dict:
    import torch

    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise SelfRewardError(f"PairRM folder {folder} has neither model.safetensors nor pytorch_model.bin")


def load_pairrm(source: str):
    """(model, tokenizer) from a local folder or a hub id; the model in eval mode on the device."""
    from transformers import AutoTokenizer, DebertaV2Config

    folder = _folder(source)
    raw = json.loads((folder / "config.json").read_text())
    missing = [k for k in EXTRA_KEYS if k not in raw]
    if raw.get("model_type") != "deberta-v2" or missing:
        raise SelfRewardError(f"'{source}' is not a PairRM checkpoint: config.json needs model_type 'deberta-v2' "
                              f"and the keys {', '.join(EXTRA_KEYS)}" + (f" (missing {', '.join(missing)})"
                                                                         if missing else ""))
    config = DebertaV2Config(**raw)
    model = build_module(config)
    state = _state_dict(folder)
    # transformers < 4.31 saved this buffer; the module rebuilds it, so it is no weight to check.
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    expected = set(model.state_dict())
    absent, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if absent or extra:
        raise SelfRewardError(f"'{source}' does not match the PairRM layout: missing {absent[:5] or 'none'}, "
                              f"unexpected {extra[:5] or 'none'}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes that disagree with config.json
        raise SelfRewardError(f"'{source}' weights do not fit its config.json: {str(e).splitlines()[-1].strip()}") \
            from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise SelfRewardError(f"cannot load the PairRM tokenizer from {folder}: {str(e).splitlines()[0]}") from None
    for key, token in PREFIXES.items():
        if tokenizer.convert_tokens_to_ids(token) != raw[key]:
            raise SelfRewardError(f"PairRM tokenizer in {folder} maps {token} to "
                                  f"{tokenizer.convert_tokens_to_ids(token)}, but config.json says {key}={raw[key]}")
    return model.eval().to(device()), tokenizer


def encode_pair(tokenizer, prompt: str, a: str, b: str) -> list[int]:
    """The model card's input: [CLS]<|source|>prompt[SEP][CLS]<|candidate1|>A[SEP][CLS]<|candidate2|>B[SEP]."""
    prompt, a, b = (_strip_prefixes(t) for t in (prompt, a, b))
    source = tokenizer.encode(PREFIXES["source_prefix_id"] + prompt, max_length=SOURCE_MAX, truncation=True)
    cand_max = (TOTAL_MAX - len(source)) // 2
    c1 = tokenizer.encode(PREFIXES["cand1_prefix_id"] + a, max_length=cand_max, truncation=True)
    c2 = tokenizer.encode(PREFIXES["cand2_prefix_id"] + b, max_length=cand_max, truncation=True)
    return source + c1 + c2


def _strip_prefixes(text: str) -> str:
    # A prefix token inside a text would be read as a second marker and move the gathered position.
    for token in PREFIXES.values():
        text = text.replace(token, "")
    return text


def pair_logits(model, tokenizer, ids: list[list[int]], batch_size: int = 8, bar=None) -> list[float]:
    """logit(A > B) for each encoded pair, in order; padded batches of similar lengths."""
    import torch

    order = sorted(range(len(ids)), key=lambda n: len(ids[n]))
    out = [0.0] * len(ids)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(ids[n]) for n in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, n in enumerate(chunk):
                input_ids[row, :len(ids[n])] = torch.tensor(ids[n])
                mask[row, :len(ids[n])] = 1
            logits = model(input_ids.to(dev), mask.to(dev)).float().cpu().tolist()
            for n, value in zip(chunk, logits):
                out[n] = value
            if bar is not None:
                bar.update(len(chunk))
    return out


def margin_scores(m: list[list[float]]) -> list[float]:
    """score_i = mean over j != i of (M[i][j] - M[j][i]); they sum to zero over a group."""
    n = len(m)
    return [sum(m[i][j] - m[j][i] for j in range(n) if j != i) / (n - 1) for i in range(n)]


def outcome(ab: float, ba: float) -> str:
    """Winner of a pair from logit(a > b) with a first and logit(b > a) with b first."""
    if (ab > 0 and ba > 0) or (ab < 0 and ba < 0):
        return "inconsistent"  # each order prefers its first response
    if ab == ba:
        return "tie"
    return "a" if ab > ba else "b"


class PairRMJudge(LocalModelJudge):
    kind = "pairrm"

    def _load(self, source: str):
        return load_pairrm(source)

    def judge_groups(self, groups: list[Group], samples: int, seed: int) -> list[GroupResult]:
        """One verdict per response (PairRM is deterministic, so `samples` and `seed` change nothing)."""
        from tqdm.auto import tqdm

        model, tokenizer = self.load()
        jobs = [(gi, i, j) for gi, g in enumerate(groups) for i in range(len(g.responses))
                for j in range(len(g.responses)) if i != j]
        ids = [encode_pair(tokenizer, groups[gi].instruction, groups[gi].responses[i], groups[gi].responses[j])
               for gi, i, j in jobs]
        bar = tqdm(total=len(jobs), desc="judge (pairrm)", unit="pair", leave=False)
        try:
            logits = pair_logits(model, tokenizer, ids, self.batch_size, bar)
        finally:
            bar.close()
        matrices = [[[0.0] * len(g.responses) for _ in g.responses] for g in groups]
        for (gi, i, j), value in zip(jobs, logits):
            matrices[gi][i][j] = value
        return [_result(g, m) for g, m in zip(groups, matrices)]


def _result(g: Group, m: list[list[float]]) -> GroupResult:
    n = len(g.responses)
    if n < 2:
        return GroupResult([[Verdict(None, Parsed(None, "", "PairRM needs at least two responses to compare"))]
                            for _ in g.responses])
    rationale = f"PairRM: mean logit margin over {n - 1} opponents"
    verdicts = [[Verdict(None, Parsed(s, rationale))] for s in margin_scores(m)]
    comparisons = [Comparison(a, b, 0, outcome(m[a][b], m[b][a]),
                              Verdict(None, Parsed(m[a][b], "logit A>B")), Verdict(None, Parsed(m[b][a], "logit A>B")))
                   for a, b in combinations(range(n), 2)]
    return GroupResult(verdicts, comparisons)
