"""Generation engines: the only place that generates text. The policy and every
LLM judge (the self judge, and the API judge through the openai engine) call
`generate(prompts, n, sampling)` on one of these.

| name           | what runs                                                    | seeds               |
|----------------|--------------------------------------------------------------|---------------------|
| `transformers` | `generate` in this process, batched                          | per batch           |
| `vllm`         | one long-lived vLLM OpenAI server per model, in its own      | per request         |
|                | process group, driven through the openai engine              |                     |
| `ray`          | a Ray Data job per generation, its rows served by vLLM       | per request         |
|                | engine replicas (Ray actors), on a local cluster or a remote |                     |
|                | one (ray_address)                                            |                     |
| `openai`       | any OpenAI-compatible server (vLLM, SGLang, llama.cpp, API), | per request, if the |
|                | or several replicas of one, with failover between them       | server honours them |

A prompt is a chat (a list of messages) or a raw string (a completion prompt,
such as self-instruct's numbered list). A failure of one item (a prompt longer
than the context, an HTTP 400, a reply that is not a completion) comes back as
that item's Completion with `error` set and the stage goes on; a failure of the
whole system (unreachable, 401/403, 5xx after the retries, on every replica) raises
SelfRewardError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# The shared types live in base.py, so that the engines import them without importing this registry.
from selfreward.backends.engines.base import (SCORE_CHOICES, Completion, Engine, OnDone, Prompt, Sampling,  # noqa: F401
                                             context_ids, failed, sum_choices)


def _transformers(cfg, model_path: str, workdir: Path | None) -> Engine:
    from selfreward.backends.engines.hf import TransformersEngine
    from selfreward.backends.models import use_bf16

    return TransformersEngine(model_path, cfg.gen_batch_size, bf16=use_bf16(cfg.generation_precision))


def _vllm(cfg, model_path: str, workdir: Path | None) -> Engine:
    from selfreward.backends.engines.vllm import VLLMEngine

    return VLLMEngine.from_config(cfg, model_path, workdir)


def _ray(cfg, model_path: str, workdir: Path | None) -> Engine:
    from selfreward.backends.engines.ray_data import RayEngine

    return RayEngine.from_config(cfg, model_path, workdir)


def _openai(cfg, model_path: str, workdir: Path | None) -> Engine:
    from selfreward.backends.engines.openai import OpenAIEngine

    return OpenAIEngine.from_config(cfg)


# name -> factory(cfg, model_path, workdir). Imports stay inside the factories: a
# backend's heavy dependencies load only when it is used.
ENGINES: dict[str, Callable[..., Engine]] = {"transformers": _transformers, "vllm": _vllm, "ray": _ray,
                                             "openai": _openai}
# Engines that load a model folder, so they can serve a policy that changes every round.
POLICY_ENGINES = ("transformers", "vllm", "ray")


def make_engine(cfg, model_path: str, workdir: Path | None = None, name: str | None = None) -> Engine:
    from selfreward.errors import SelfRewardError

    name = name or cfg.engine
    if name not in ENGINES:
        raise SelfRewardError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)}")
    return ENGINES[name](cfg, model_path, workdir)
