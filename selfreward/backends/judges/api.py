"""API judge: any OpenAI-compatible chat endpoint (vLLM's server, llama.cpp's
server, a hosted model) with the same templates and parsers as the self judge.

The key comes from an environment variable whose *name* is configured; the
value is never stored. Requests run with bounded concurrency, a per-request
timeout, and retries with exponential backoff on 429, 5xx and timeouts.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

from selfreward.errors import SelfRewardError
from selfreward.backends.judges.llm import Output

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ApiBackend:
    """A TextBackend for LLMJudge: one chat completion per (prompt, sample)."""

    def __init__(self, base_url: str, model: str, sampling, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0,
                 checkpoint=None):
        from openai import OpenAI  # lazy: only API users need the client at import time

        if not base_url:
            raise SelfRewardError("judge 'api' needs judge_api_base, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise SelfRewardError("judge 'api' needs judge_api_model, the model name the server serves")
        # Local servers take any key; hosted ones need the real one from the environment.
        key = os.environ.get(api_key_env) or "not-set"
        # The client's own retries are off: ours count 429/5xx/timeouts and back off the same way for all.
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self.base_url, self.model, self.sampling = base_url, model, sampling
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.checkpoint = checkpoint
        self.name = f"api:{model}"

    def request(self, prompt: str, seed: int) -> tuple[str, dict]:
        """One chat completion with retries; returns (text, usage)."""
        import openai

        messages = [{"role": "user", "content": prompt}]
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.sampling.temperature,
                    top_p=self.sampling.top_p, max_tokens=self.sampling.max_new_tokens, seed=seed)
                usage = {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens} \
                    if r.usage else {}
                return (r.choices[0].message.content or ""), usage
            except openai.APIConnectionError as e:
                # Timeouts are retried; a refused connection means a wrong URL or a server that is down.
                if not isinstance(e, openai.APITimeoutError):
                    raise SelfRewardError(f"judge API at {self.base_url} is unreachable: {e.__cause__ or e}") from None
                error, retry_after = "timeout", None
            except openai.APIStatusError as e:
                if e.status_code not in RETRYABLE_STATUS:
                    raise SelfRewardError(f"judge API at {self.base_url} refused the request "
                                          f"(HTTP {e.status_code}): {_message(e)}") from None
                error = f"HTTP {e.status_code}"
                retry_after = _retry_after(e)
            if attempt == self.max_retries:
                raise SelfRewardError(f"judge API at {self.base_url} kept failing ({error}) after "
                                      f"{self.max_retries} retries; run again later to resume")
            wait = self.backoff * 2**attempt * (0.5 + random.random())
            if error.startswith("HTTP") and retry_after is not None:
                wait = max(wait, retry_after)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def complete(self, prompts, n, seed):
        jobs = [(i, k) for i in range(len(prompts)) for k in range(n)]
        results: dict[tuple[int, int], Output] = {}
        keys = {}
        if self.checkpoint:
            # Answers a killed stage already paid for are taken, not asked again.
            params = (self.sampling.temperature, self.sampling.top_p, self.sampling.max_new_tokens, seed)
            keys = {(i, k): self.checkpoint.key(f"api|{self.model}", prompts[i], k, params)
                    for i, k in jobs}
            done = self.checkpoint.get_many(list(keys.values()))
            for job, key in keys.items():
                if key in done:
                    results[job] = Output(done[key]["text"], done[key]["n_tokens"], done[key]["usage"])
        todo = [job for job in jobs if job not in results]
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="judge (api)", unit="req", leave=False)

        def work(job):
            i, k = job
            text, usage = self.request(prompts[i], seed + 7919 * k + i)
            return job, Output(text, usage.get("completion_tokens"), usage)

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        futures = [pool.submit(work, job) for job in todo]
        try:
            for future in as_completed(futures):
                job, output = future.result()
                results[job] = output
                if self.checkpoint:
                    self.checkpoint.put_many([{"key": keys[job], "text": output.text, "n_tokens": output.n_tokens,
                                               "finish_reason": "stop", "usage": output.usage}])
                bar.update(1)
        finally:
            # On a failure, queued requests are dropped rather than sent.
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return [[results[(i, k)] for k in range(n)] for i in range(len(prompts))]


def _message(e) -> str:
    body = e.body
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)
    return str(e)


def _retry_after(e) -> float | None:
    try:
        return float(e.response.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
