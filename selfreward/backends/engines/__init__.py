"""Generation engines behind one small interface, picked by name from a plain dict.

`generate(prompts, n, sampling)` takes chat prompts (lists of messages) or raw
strings (for completion-style prompts such as self-instruct) and returns, for
each prompt, n Completions. Engines batch internally; callers pass everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max_new_tokens)


Prompt = str | list[dict]


class Engine(Protocol):
    model_path: str

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "") -> list[list[Completion]]: ...

    def chunk_prompts(self, n: int) -> int:
        """How many prompts (n samples each) to generate between checkpoints."""
        ...

    def close(self) -> None: ...


def make_engine(name: str, model_path: str, batch_size: int) -> Engine:
    # Imports stay inside: the vllm engine must not import vllm on machines without it.
    if name == "transformers":
        from selfreward.backends.engines.hf import TransformersEngine

        return TransformersEngine(model_path, batch_size)
    if name == "vllm":
        from selfreward.backends.engines.vllm import VLLMEngine

        return VLLMEngine(model_path)
    from selfreward.errors import SelfRewardError

    raise SelfRewardError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)}")


ENGINES = ("transformers", "vllm")
