"""The openai engine: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's
server, a hosted API), through the real `openai` client.

One request per (prompt, sample), with bounded concurrency, so that a server
without `n` support works and each sample carries its own seed. Chat prompts go
to /chat/completions, raw strings to /completions.

Retries are ours, not the client's (its max_retries is 0): we need to know, per
request, how many retries it took (stored with each row) and to tell an item's
own failure from the system's:
- retried with exponential backoff and jitter (Retry-After honoured): 429, 408,
  409, 5xx, timeouts, connection resets, and replies that are not a completion;
- the item fails and the stage goes on: any other 4xx (an over-long prompt gets
  400), or a reply still unreadable after the retries;
- the stage stops with one line: unreachable at the start, 401/403/404, or
  429/5xx/timeouts/resets still failing after the retries.
The key comes from the environment variable named by `api_key_env`; only the
name is ever stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

from selfreward.backends.engines import Completion, OnDone, Prompt, Sampling, failed, sum_choices
from selfreward.errors import SelfRewardError

# How many of the most likely first tokens a server returns when asked for probabilities.
TOP_LOGPROBS = 20
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}


class SystemFailure(Exception):
    """The server, not the item, is at fault: the stage stops."""


def request_seed(seed: int, prompt: Prompt, sample: int) -> int:
    """A seed per (stage seed, prompt, sample): the same whatever the batching or a resume."""
    blob = json.dumps([seed, prompt, sample], sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) % (2**31)


class OpenAIEngine:
    seeds_per_request = True

    def __init__(self, base_url: str, model: str, key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 5, send_seed: bool = True, backoff: float = 1.0,
                 name: str | None = None):
        from openai import OpenAI  # lazy: the client loads only for this engine

        if not base_url:
            raise SelfRewardError("the openai engine needs api_base, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise SelfRewardError("the openai engine needs api_model, the model name the server serves")
        # Local servers take any key; hosted ones need the real one from the environment.
        key = os.environ.get(key_env) or "not-set"
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self.base_url, self.served_model, self.model_path = base_url, model, model
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.send_seed, self.key_env = send_seed, key_env
        self.name = name or f"openai:{model}"
        self._checked = False

    @classmethod
    def from_config(cls, cfg) -> "OpenAIEngine":
        return cls(cfg.api_base, cfg.api_model, cfg.api_key_env, cfg.api_concurrency, cfg.api_timeout,
                   cfg.api_max_retries, send_seed=cfg.api_send_seed == "yes", backoff=cfg.api_backoff)

    # --- one request ---
    def request(self, prompt: Prompt, sampling: Sampling, seed: int) -> Completion:
        """One completion, retried as the module doc says; raises SystemFailure."""
        import openai

        error = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                return self._ask(prompt, sampling, seed, attempt)
            except openai.APITimeoutError:
                error = "timeout"
            except openai.APIConnectionError as e:
                error = f"connection failed ({e.__cause__ or e})"
            except openai.APIStatusError as e:
                if e.status_code in FATAL_STATUS:
                    raise SystemFailure(f"API at {self.base_url} refused the request (HTTP {e.status_code}): "
                                        f"{_message(e)}") from None
                if e.status_code not in RETRYABLE_STATUS:
                    return failed(f"HTTP {e.status_code}: {_message(e)}", attempt)
                error, retry_after = f"HTTP {e.status_code}", _retry_after(e)
            except Garbage as e:
                if attempt == self.max_retries:
                    return failed(f"unreadable reply: {e}", attempt)
                error = f"unreadable reply: {e}"
            if attempt == self.max_retries:
                raise SystemFailure(f"API at {self.base_url} kept failing ({error}) after {self.max_retries} "
                                    f"retries; run the same command again to resume")
            wait = self.backoff * 2**attempt * (0.5 + random.random())
            time.sleep(max(wait, retry_after) if retry_after is not None else wait)
        raise AssertionError("unreachable")

    def _ask(self, prompt: Prompt, sampling: Sampling, seed: int, retries: int) -> Completion:
        import openai

        kwargs = {"model": self.served_model, "temperature": sampling.temperature, "top_p": sampling.top_p,
                  "max_tokens": sampling.max_new_tokens}
        if self.send_seed:
            kwargs["seed"] = seed
        chat = _is_chat(prompt)
        if sampling.top_logprobs:
            kwargs.update({"logprobs": True, "top_logprobs": sampling.top_logprobs} if chat
                          else {"logprobs": sampling.top_logprobs})
        if chat and prompt and prompt[-1]["role"] == "assistant":
            # Continue the answer written so far (vLLM's and SGLang's chat extension).
            kwargs["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        try:
            if not chat:  # a raw string or token ids: the completions endpoint
                r = self.client.completions.create(prompt=prompt, **kwargs)
            else:
                r = self.client.chat.completions.create(messages=prompt, **kwargs)
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as e:
            raise Garbage(type(e).__name__) from None
        choices = getattr(r, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise Garbage("no choices")
        choice = choices[0]
        text = choice.text if not chat else (choice.message.content if choice.message else None)
        if not isinstance(text, str):
            text = ""  # an empty answer is the item's own output: the judge's parser says "empty output"
        usage = r.usage
        n_tokens = usage.completion_tokens if usage else None
        return Completion(text.strip(), n_tokens, "length" if choice.finish_reason == "length" else "stop",
                          retries=retries,
                          usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
                          if usage else None,
                          top_logprobs=_first_top_logprobs(choice, chat) if sampling.top_logprobs else None)

    def check_reachable(self) -> None:
        """Fail at once, in one line, when nothing listens at base_url (instead of after the retries)."""
        import openai

        if self._checked:
            return
        try:
            self.client.models.list(timeout=min(10.0, self.client.timeout))
        except openai.APIConnectionError as e:
            raise SelfRewardError(f"API at {self.base_url} is unreachable: {e.__cause__ or e}") from None
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise SelfRewardError(f"API at {self.base_url} refused the key in ${self.key_env} "
                                      f"(HTTP {e.status_code}): {_message(e)}") from None
            # Some servers do not list models; a real request will tell.
        self._checked = True

    # --- the Engine interface ---
    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate",
                 on_done: OnDone | None = None) -> list[list[Completion]]:
        self.check_reachable()
        out: list[list[Completion | None]] = [[None] * n for _ in prompts]
        left = [n] * len(prompts)
        lock = threading.Lock()
        bar = tqdm(total=len(prompts) * n, desc=desc, unit="req", leave=False)

        def work(i: int, j: int):
            return i, j, self.request(prompts[i], sampling, request_seed(sampling.seed, prompts[i], j))

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        futures = [pool.submit(work, i, j) for i in range(len(prompts)) for j in range(n)]
        try:
            for future in as_completed(futures):
                try:
                    i, j, completion = future.result()
                except SystemFailure as e:
                    raise SelfRewardError(str(e)) from None
                with lock:
                    out[i][j] = completion
                    left[i] -= 1
                    finished = left[i] == 0
                if finished and on_done:
                    on_done(i, out[i])
                bar.update(1)
        finally:
            # On a failure, queued requests are dropped rather than sent.
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return out  # type: ignore[return-value]

    def choice_probs(self, prompts: list[Prompt], outputs: list[str], cuts: list[int],
                     choices: tuple[str, ...]) -> list[dict[str, float] | None]:
        """Any server: the answer so far as an assistant turn to continue, one new token, and its
        top log-probabilities (needs a server that continues a final message, as vLLM and SGLang do)."""
        asks = [[*p, {"role": "assistant", "content": o[:c]}] if _is_chat(p) else p + o[:c]
                for p, o, c in zip(prompts, outputs, cuts)]
        return self.read_probs(asks, choices)

    def read_probs(self, asks: list[Prompt], choices: tuple[str, ...]) -> list[dict[str, float] | None]:
        outs = self.generate(asks, 1, Sampling(0.0, 1.0, 1, 0, top_logprobs=TOP_LOGPROBS), desc="score probabilities")
        return [sum_choices(o[0].top_logprobs, choices) if o[0].top_logprobs else None for o in outs]

    def chunk_prompts(self, n: int) -> int:
        # Seeds are per request and each finished prompt is reported through on_done: no chunking.
        return 1 << 30

    def close(self) -> None:
        self.client.close()


def _is_chat(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _first_top_logprobs(choice, chat: bool) -> dict[str, float] | None:
    """token -> log-probability at the first new token, from either endpoint's reply."""
    logprobs = getattr(choice, "logprobs", None)
    try:
        if chat:
            return {t.token: t.logprob for t in logprobs.content[0].top_logprobs}
        return dict(logprobs.top_logprobs[0])
    except (AttributeError, IndexError, TypeError):
        return None


class Garbage(Exception):
    """A 200 reply that is not a completion (not JSON, no choices)."""


def _message(e) -> str:
    body = e.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or body
        return str(message.get("message", message) if isinstance(message, dict) else message)
    return str(e)


def _retry_after(e) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
