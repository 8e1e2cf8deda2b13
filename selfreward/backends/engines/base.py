"""What every engine shares: the sampling settings, a completion, the Engine protocol and
the helpers the engines use (selfreward.backends.engines tells the engines apart)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    top_logprobs: int = 0       # > 0: also return the first new token's top log-probabilities


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int | None
    finish_reason: str          # "stop", "length" (hit max_new_tokens) or "error" (see `error`)
    error: str | None = None    # why this one item failed; its text is ""
    retries: int = 0            # requests repeated before this answer (openai engine)
    usage: dict | None = None   # server-reported token usage
    top_logprobs: dict | None = None  # token -> log-probability at the first new token (Sampling.top_logprobs)
    endpoint: str | None = None       # the server that answered (openai engine), without credentials or query
    served_model: str | None = None   # the model that server says answered


Prompt = str | list[dict]
OnDone = Callable[[int, list[Completion]], None]
# The additive judge's score values, whose next-token probabilities give its expected score (G-Eval).
SCORE_CHOICES = ("0", "1", "2", "3", "4", "5")


def failed(reason: str, retries: int = 0) -> Completion:
    return Completion("", 0, "error", reason, retries)


def context_ids(tokenizer, rendered: str, output: str, cut: int) -> list[int] | None:
    """Token ids of a rendered prompt and an answer to it, up to (not including) the token that
    holds output[cut]; that token may start with the space before the character. One
    tokenization of the whole text, as the model read it, so no token is split at the cut."""
    enc = tokenizer(rendered + output, add_special_tokens=False, return_offsets_mapping=True)
    target = len(rendered) + cut
    k = next((k for k, (_, end) in enumerate(enc["offset_mapping"]) if end > target), None)
    return enc["input_ids"][:k] if k else None


def sum_choices(top: dict[str, float], choices: tuple[str, ...]) -> dict[str, float]:
    """A server's top log-probabilities as probabilities per choice: tokens spelling a choice
    with or without a leading space count for it; choices not among the top count 0."""
    import math

    out = {c: 0.0 for c in choices}
    for token, logprob in top.items():
        if token.strip() in out:
            out[token.strip()] += math.exp(logprob)
    return out


class Engine(Protocol):
    name: str                  # e.g. "transformers", "vllm", "openai:<model>"
    model_path: str            # what it serves: a folder, or the server's model name
    seeds_per_request: bool    # True: results do not depend on how prompts are batched

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "",
                 on_done: OnDone | None = None) -> list[list[Completion]]:
        """n Completions per prompt; `on_done(i, completions)` as each prompt finishes."""
        ...

    def chunk_prompts(self, n: int) -> int:
        """How many prompts (n samples each) to generate between checkpoints."""
        ...

    # Optional, where the engine can read log-probabilities (transformers, vllm, openai, scripted):
    # def choice_probs(self, prompts, outputs, cuts, choices) -> list[dict[str, float] | None]
    #     For each prompt and an answer already generated to it, the probability of each choice
    #     being the next token after outputs[i][:cuts[i]] (the token that holds outputs[i][cuts[i]]),
    #     summed over the tokens that spell the choice (with or without a leading space); None
    #     where it could not be read. One forward pass, or one max_tokens=1 request, per item.

    def close(self) -> None: ...
