"""Any sequence-classification model as a pointwise judge, from a folder or hub id.

The input is the chat [user: instruction, assistant: response] when the tokenizer
has a chat template (reward models trained on chats), else the pair (instruction,
response) as two segments (cross-encoders). The score is the single logit of a
1-label head (a reward model) or the positive-class probability of a 2-label one.
"""

from __future__ import annotations

from selfreward.errors import SelfRewardError
from selfreward.backends.judges.base import Group, LocalModelJudge, PointwiseJudge, Verdict
from selfreward.backends.models import device, resolve_source
from selfreward.prompts import Parsed

POSITIVE_NAMES = ("positive", "pos", "label_1")
FALLBACK_MAX_LENGTH = 2048


def score_head(config) -> tuple[int | None, str]:
    """(index of the positive class or None for a 1-logit head, a name for the score)."""
    if config.num_labels == 1:
        return None, "logit"
    if config.num_labels == 2:
        names = {int(i): str(name) for i, name in config.id2label.items()}
        index = next((i for i, name in names.items() if name.lower() in POSITIVE_NAMES), 1)
        return index, f"P({names[index]})"
    raise SelfRewardError(f"reward model head has {config.num_labels} labels; supported are 1 (a reward logit) "
                          f"and 2 (the probability of the positive class)")


def load_reward_model(source: str):
    """(model in eval mode on the device, tokenizer that can pad) for a sequence-classification model."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_source(source)
    try:
        score_head(AutoConfig.from_pretrained(path))  # refuses an unsupported head before loading weights
        tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if device() == "cuda" else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:  # missing files, unreachable hub, a model type with no classification head
        raise SelfRewardError(f"cannot load reward model '{source}': {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SelfRewardError(f"tokenizer of '{source}' has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        # Decoder heads find each row's last token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().to(device()), tokenizer


def max_length(tokenizer) -> int:
    # Tokenizers that declare no limit report a huge sentinel (int(1e30)).
    return tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else FALLBACK_MAX_LENGTH


def encode(tokenizer, instruction: str, response: str) -> dict:
    limit = max_length(tokenizer)
    if tokenizer.chat_template:
        chat = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        # The template writes its own special tokens.
        return tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit)
    return tokenizer(instruction, response, truncation=True, max_length=limit)


class RewardModelJudge(LocalModelJudge, PointwiseJudge):
    kind = "reward-model"

    def _load(self, source: str):
        return load_reward_model(source)

    def score_many(self, items: list[tuple[Group, int]], samples: int, seed: int) -> list[list[Verdict]]:
        """One verdict per item (the model is deterministic, so `samples` and `seed` change nothing)."""
        import torch
        from tqdm.auto import tqdm

        model, tokenizer = self.load()
        index, kind = score_head(model.config)
        encoded = [encode(tokenizer, g.instruction, g.responses[i]) for g, i in items]
        order = sorted(range(len(encoded)), key=lambda n: len(encoded[n]["input_ids"]))
        scores = [0.0] * len(encoded)
        bar = tqdm(total=len(encoded), desc="judge (reward-model)", unit="resp", leave=False)
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    batch = tokenizer.pad([encoded[n] for n in chunk], return_tensors="pt").to(model.device)
                    logits = model(**batch).logits.float()
                    values = logits[:, 0] if index is None else logits.softmax(-1)[:, index]
                    for n, value in zip(chunk, values.cpu().tolist()):
                        scores[n] = value
                    bar.update(len(chunk))
        finally:
            bar.close()
        return [[Verdict(None, Parsed(s, f"reward model {kind}"))] for s in scores]
