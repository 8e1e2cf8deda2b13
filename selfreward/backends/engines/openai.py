"""The openai engine: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's
server, a hosted API), or several replicas of one, through the real `openai` client.

One request per (prompt, sample), with bounded concurrency, so that a server
without `n` support works and each sample carries its own seed. Chat prompts go
to /chat/completions, raw strings to /completions.

Retries are ours, not the client's (its max_retries is 0): we need to know, per
request, how many retries it took (stored with each row) and to tell an item's
own failure from the system's:
- retried with exponential backoff and jitter: 429, 408, 409, 5xx, timeouts,
  connection resets, and replies that are not a completion. A server's
  Retry-After (seconds or an HTTP date) or retry-after-ms is honoured up to
  MAX_WAIT and each such wait is logged; a longer one stops the stage (resume
  later). Every wait ends at once when the stage stops (Ctrl-C, a failure);
- the item fails and the stage goes on: any other 4xx (an over-long prompt gets
  400), or a reply still unreadable after the retries;
- the stage stops with one line: 401/403/404, every replica unreachable or
  out of rotation, or a server asking to wait longer than MAX_WAIT.

`timeout` bounds each request in all, from connecting to the last byte: the
client's own timeout bounds each read, so a server that trickles bytes would
hold a request forever. Each answer records the replica's URL (without
credentials or query) and the model name the server reported.

Replicas: `base_url` may name several servers of the same model. Each gets at
most `concurrency` requests in flight; a request goes to the in-rotation replica
with the fewest in flight. A replica leaves the rotation when a request to it
still fails after its retries (429/5xx/timeouts/resets), or at once when it
refuses the connection while another replica is still in rotation (nothing
listens there: a crashed server). The item then moves to another replica, so
every item gets exactly one answer. After `cooldown` seconds one request probes
the replica, without retries: an answer puts it back, a failure takes it out
for another cool-down. Item failures never take a replica out. With one URL
this is the single-server behaviour above.
The key comes from the environment variable named by `api_key_env`; only the
name is ever stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlsplit, urlunsplit

from tqdm.auto import tqdm

from selfreward.backends.engines.base import Completion, OnDone, Prompt, Sampling, failed, sum_choices
from selfreward.errors import SelfRewardError

# How many of the most likely first tokens a server returns when asked for probabilities.
TOP_LOGPROBS = 20
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}
# The longest wait a server's Retry-After gets (the openai client's own retries stop at the same);
# a quota reply asking for an hour stops the stage instead of parking it.
MAX_WAIT = 120.0


class SystemFailure(Exception):
    """The servers, not the item, are at fault: the stage stops."""


class Stopped(Exception):
    """The stage is stopping (Ctrl-C, or another request's failure): end this request's waits now."""


class Deadline(Exception):
    """No whole reply within the request's deadline."""


class ReplicaDown(Exception):
    """One replica failed a request past its retries (or refused it): the item moves to another."""

    def __init__(self, reason: str, retries: int):
        super().__init__(reason)
        self.reason, self.retries = reason, retries


def request_seed(seed: int, prompt: Prompt, sample: int) -> int:
    """A seed per (stage seed, prompt, sample): the same whatever the batching or a resume."""
    blob = json.dumps([seed, prompt, sample], sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) % (2**31)


def public_url(url: str) -> str:
    """A server's URL as it may be stored: without user, password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def split_urls(base_url: str | list[str]) -> list[str]:
    """'http://a/v1, http://b/v1' or a list -> the list of replica URLs."""
    urls = base_url if isinstance(base_url, list) else base_url.split(",")
    return [u.strip() for u in urls if u.strip()]


class Replica:
    """One server of the pool: its client, its slots in use, its place in the rotation, its counts."""

    def __init__(self, url: str, client):
        self.url, self.client = url, client
        self.public_url = public_url(url)
        self.in_flight = 0
        self.in_rotation, self.probing = True, False
        self.out_until, self.reason = 0.0, ""
        # requests: sent, retries included; answered: items whose final answer came from here;
        # failures: requests that failed for the server's reasons; outs: times taken out of rotation.
        self.counts = {"requests": 0, "answered": 0, "failures": 0, "outs": 0}
        self.taken = dict(self.counts)


class OpenAIEngine:
    seeds_per_request = True

    def __init__(self, base_url: str | list[str], model: str, key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 5, send_seed: bool = True, backoff: float = 1.0,
                 name: str | None = None, cooldown: float = 30.0, sockets: list[str] | None = None):
        """sockets: Unix socket paths, one per replica, for servers this project started (the vllm
        engine); the replicas are then named `unix:<path>` and no key from the environment is sent."""
        from openai import OpenAI  # lazy: the client loads only for this engine

        urls = [f"unix:{s}" for s in sockets] if sockets else split_urls(base_url)
        if not urls:
            raise SelfRewardError("the openai engine needs api_base, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise SelfRewardError("the openai engine needs api_model, the model name the server serves")
        # Local servers take any key; hosted ones need the real one from the environment.
        key = (not sockets and os.environ.get(key_env)) or "not-set"

        def client(url: str):
            if url.startswith("unix:"):  # a server this project started: its socket, and never a hosted key
                return OpenAI(base_url="http://localhost/v1", api_key="not-set", timeout=timeout, max_retries=0,
                              http_client=_uds_client(url.removeprefix("unix:")))
            return OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0)

        self.replicas = [Replica(url, client(url)) for url in urls]
        self.served_model, self.model_path = model, model
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.timeout, self.cooldown = timeout, cooldown
        self.send_seed, self.key_env = send_seed, key_env
        self.name = name or f"openai:{model}"
        self._checked = False
        self._pool = threading.Condition()
        self._stop = threading.Event()

    @classmethod
    def from_config(cls, cfg) -> "OpenAIEngine":
        return cls(cfg.api_base, cfg.api_model, cfg.api_key_env, cfg.api_concurrency, cfg.api_timeout,
                   cfg.api_max_retries, send_seed=cfg.api_send_seed, backoff=cfg.api_backoff,
                   cooldown=cfg.api_replica_cooldown)

    # --- one item: a replica, and another if that one goes down ---
    def request(self, prompt: Prompt, sampling: Sampling, seed: int) -> Completion:
        """One completion from whichever replica has a free slot; raises SystemFailure."""
        retries = 0
        while True:
            replica = self._take()
            try:
                completion = self._request_on(replica, prompt, sampling, seed, retries)
            except ReplicaDown as e:
                self._give_back(replica, down=e.reason)
                retries = e.retries + 1  # the next replica's first try is a retry of this item
                continue
            except BaseException:
                self._give_back(replica)
                raise
            self._give_back(replica, answered=True)
            return completion

    def _take(self) -> Replica:
        """A slot on the least busy replica in rotation (or one due for its probe); waits while all are full."""
        with self._pool:
            while True:
                now = time.monotonic()
                due = [r for r in self.replicas if not r.in_rotation and not r.probing and now >= r.out_until]
                if due:
                    due[0].probing = True
                    due[0].in_flight += 1
                    return due[0]
                ready = [r for r in self.replicas if r.in_rotation and r.in_flight < self.concurrency]
                if ready:
                    replica = min(ready, key=lambda r: (r.in_flight, r.counts["requests"]))
                    replica.in_flight += 1
                    return replica
                if not any(r.in_rotation or r.probing for r in self.replicas):
                    raise SystemFailure(self._all_out())
                self._pool.wait(timeout=1.0)  # a slot frees, a replica goes out, or a cool-down ends

    def _give_back(self, replica: Replica, down: str | None = None, answered: bool = False) -> None:
        with self._pool:
            replica.in_flight -= 1
            replica.counts["answered"] += answered
            if down and (replica.in_rotation or replica.probing):
                replica.in_rotation, replica.probing = False, False
                replica.out_until, replica.reason = time.monotonic() + self.cooldown, down
                replica.counts["outs"] += 1
                left = sum(r.in_rotation for r in self.replicas)
                if len(self.replicas) > 1:
                    tqdm.write(f"replica {replica.url} out of rotation ({down}); {left} of {len(self.replicas)} "
                               f"in rotation, probed again in {self.cooldown:g} s", file=sys.stderr)
            elif replica.probing and not down:
                # It answered (an item failure is an answer too): back in rotation.
                replica.in_rotation, replica.probing = True, False
                tqdm.write(f"replica {replica.url} back in rotation", file=sys.stderr)
            self._pool.notify_all()

    def _all_out(self) -> str:
        if len(self.replicas) == 1:
            r = self.replicas[0]
            return (f"API at {r.url} kept failing ({r.reason}) after {self.max_retries} retries; "
                    f"run the same command again to resume")
        return ("every replica is out of rotation: " + "; ".join(f"{r.url} ({r.reason})" for r in self.replicas)
                + "; run the same command again to resume")

    # --- one item on one replica ---
    def _request_on(self, replica: Replica, prompt: Prompt, sampling: Sampling, seed: int,
                    retries: int) -> Completion:
        """The item's completion from `replica`, retried as the module doc says; raises ReplicaDown
        (move the item elsewhere) or SystemFailure (stop the stage)."""
        import openai

        tries = 0 if replica.probing else self.max_retries  # a probe gets no retries
        error = ""
        for attempt in range(tries + 1):
            if attempt and not (replica.in_rotation or replica.probing):
                raise ReplicaDown(error, retries + attempt - 1)  # another request took it out: move on now
            retry_after = None
            self._count(replica, "requests")
            try:
                return self._ask(replica, prompt, sampling, seed, retries + attempt)
            except (openai.APITimeoutError, Deadline):
                error = "timeout"
            except openai.APIConnectionError as e:
                error = f"connection failed ({e.__cause__ or e})"
                # Nothing listens there (a crashed server): no use retrying while another replica can take it.
                if _refused(e) and any(r.in_rotation for r in self.replicas if r is not replica):
                    self._count(replica, "failures")
                    raise ReplicaDown("connection refused", retries + attempt) from None
            except openai.APIStatusError as e:
                if e.status_code in FATAL_STATUS:
                    raise SystemFailure(f"API at {replica.url} refused the request (HTTP {e.status_code}): "
                                        f"{_message(e)}") from None
                if e.status_code not in RETRYABLE_STATUS:
                    return failed(f"HTTP {e.status_code}: {_message(e)}", retries + attempt)
                error, retry_after = f"HTTP {e.status_code}", _retry_after(replica.client, e)
                if retry_after is not None and retry_after > MAX_WAIT:
                    raise SystemFailure(f"API at {replica.url} asks to wait {retry_after:.0f} s before retrying "
                                        f"({error}), longer than the {MAX_WAIT:g} s this run waits; run the same "
                                        f"command again later to resume") from None
            except Garbage as e:
                # The server answered, badly: retried here, and in the end the item's failure, not the replica's.
                if attempt == tries:
                    return failed(f"unreadable reply: {e}", retries + attempt)
                self._wait(self.backoff * 2**attempt * (0.5 + random.random()))
                continue
            self._count(replica, "failures")
            if attempt == tries:
                raise ReplicaDown(error, retries + attempt)
            wait = self.backoff * 2**attempt * (0.5 + random.random())
            if retry_after is not None and retry_after > wait:
                wait = retry_after
                tqdm.write(f"API at {replica.url}: {error}, retry {attempt + 1} of {tries} in {wait:.1f} s "
                           f"as its Retry-After asks", file=sys.stderr)
            self._wait(wait)
        raise AssertionError("unreachable")

    def _wait(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped()

    def _within_deadline(self, call, timeout: float):
        """call() given up after `timeout` seconds in all, or at once when the stage stops. The call
        runs in a thread of its own: the client cannot be stopped mid-read, so a call given up goes on
        until its connection ends, in a daemon thread that holds no one up."""
        done, box = threading.Event(), {}

        def run():
            try:
                box["value"] = call()
            except BaseException as e:  # handed to the caller
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, daemon=True, name="openai-request").start()
        deadline = time.monotonic() + timeout
        while not done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self._stop.is_set():
                raise Stopped()
            if time.monotonic() >= deadline:
                raise Deadline()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _count(self, replica: Replica, what: str) -> None:
        with self._pool:
            replica.counts[what] += 1

    def _ask(self, replica: Replica, prompt: Prompt, sampling: Sampling, seed: int, retries: int) -> Completion:
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
        if not chat:  # a raw string or token ids: the completions endpoint
            def call():
                return replica.client.completions.create(prompt=prompt, **kwargs)
        else:
            def call():
                return replica.client.chat.completions.create(messages=prompt, **kwargs)
        try:
            r = self._within_deadline(call, self.timeout)
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
                          top_logprobs=_first_top_logprobs(choice, chat) if sampling.top_logprobs else None,
                          endpoint=replica.public_url, served_model=_served_model(r))

    def check_reachable(self) -> None:
        """Fail at once, in one line, when no replica listens (instead of after the retries);
        a replica unreachable now starts out of rotation, to be probed after the cool-down."""
        import openai

        if self._checked:
            return
        for replica in self.replicas:
            timeout = min(10.0, self.timeout)
            try:
                self._within_deadline(lambda: replica.client.models.list(timeout=timeout), timeout)
            except Deadline:
                pass  # it listens; a real request will tell
            except openai.APIConnectionError as e:
                replica.in_rotation, replica.reason = False, f"unreachable: {e.__cause__ or e}"
                replica.out_until = time.monotonic() + self.cooldown
                replica.counts["outs"] += 1
            except openai.APIStatusError as e:
                if e.status_code in (401, 403):
                    raise SelfRewardError(f"API at {replica.url} refused the key in ${self.key_env} "
                                          f"(HTTP {e.status_code}): {_message(e)}") from None
                # Some servers do not list models; a real request will tell.
        down = [r for r in self.replicas if not r.in_rotation]
        if len(down) == len(self.replicas):
            if len(down) == 1:
                raise SelfRewardError(f"API at {down[0].url} is {down[0].reason}")
            raise SelfRewardError("every replica is unreachable: " + "; ".join(f"{r.url} ({r.reason})" for r in down))
        for r in down:
            tqdm.write(f"replica {r.url} out of rotation ({r.reason}); probed again in {self.cooldown:g} s",
                       file=sys.stderr)
        self._checked = True

    def replica_counts(self, since_last: bool = False) -> list[dict]:
        """Per replica: requests sent, items answered, failed requests, times taken out, in rotation now.
        since_last: only what happened since the previous such call (a stage's share)."""
        with self._pool:
            rows = []
            for r in self.replicas:
                counts = {k: v - r.taken[k] for k, v in r.counts.items()} if since_last else dict(r.counts)
                if since_last:
                    r.taken = dict(r.counts)
                rows.append({"url": r.url, **counts, "in_rotation": r.in_rotation})
            return rows

    # --- the Engine interface ---
    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate",
                 on_done: OnDone | None = None) -> list[list[Completion]]:
        self._stop.clear()
        self.check_reachable()
        out: list[list[Completion | None]] = [[None] * n for _ in prompts]
        left = [n] * len(prompts)
        lock = threading.Lock()
        bar = tqdm(total=len(prompts) * n, desc=desc, unit="req", leave=False)

        def work(i: int, j: int):
            return i, j, self.request(prompts[i], sampling, request_seed(sampling.seed, prompts[i], j))

        # Enough workers to fill every replica's slots; _take holds each to its replica's bound.
        pool = ThreadPoolExecutor(max_workers=self.concurrency * len(self.replicas))
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
        except BaseException:
            # Ctrl-C or a failure: the requests still waiting or in flight end now, not after their waits.
            self._stop.set()
            raise
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
        for replica in self.replicas:
            replica.client.close()


def _uds_client(path: str):
    """The openai client's HTTP over a Unix socket (the client's own connection limits: a transport
    given to the client ignores the client's). openai 3 runs on httpx2, whose transport it needs."""
    import httpx2
    from openai import DefaultHttpxClient

    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
    return DefaultHttpxClient(transport=httpx2.HTTPTransport(uds=path, limits=limits))


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


def _served_model(reply) -> str | None:
    model = getattr(reply, "model", None)
    return model if isinstance(model, str) else None


class Garbage(Exception):
    """A 200 reply that is not a completion (not JSON, no choices)."""


def _refused(e) -> bool:
    """The connection was refused (httpx says so in its ConnectError's text), not reset or timed out."""
    return isinstance(e.__cause__, ConnectionRefusedError) or "refused" in str(e.__cause__).lower()


def _message(e) -> str:
    body = e.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("error") or body
        return str(message.get("message", message) if isinstance(message, dict) else message)
    return str(e)


def _retry_after(client, e) -> float | None:
    """Seconds the server asks to wait: the client's own reading of retry-after-ms, and of Retry-After
    as seconds or as an HTTP date. None when it asks nothing readable; inf for a number too large."""
    seconds = client._parse_retry_after_header(e.response.headers)
    if seconds is None or math.isnan(seconds):
        return None
    return max(seconds, 0.0)
