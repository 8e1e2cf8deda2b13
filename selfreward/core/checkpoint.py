"""Generations checkpointed while a stage runs.

A stage still commits its outputs in one transaction; this scratch table only
keeps the generations a kill would otherwise throw away (hours of GPU judging,
or paid API calls). Each finished prompt (vllm, openai) or chunk of prompts
(transformers) is written at once, keyed by everything that determines it; a
resumed stage takes those from here and generates only the rest. The table is
emptied in the transaction that commits a stage.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from selfreward import failpoints
from selfreward.core.store import connect
from selfreward.backends.engines import Completion, Engine, Prompt, Sampling

TABLE = "generation_checkpoint"


class Checkpoint:
    """The scratch table of one run.db. Usable from several threads at once (the eval stage judges
    its probes concurrently): the thread that made it uses the run's connection, any other thread
    a connection of its own to the same file (WAL), writing one thread at a time."""

    def __init__(self, db):
        self._db, self._owner = db, threading.get_ident()
        self._path = next(row[2] for row in db.execute("pragma database_list").fetchall() if row[1] == "main")
        self._local, self._write = threading.local(), threading.Lock()

    @property
    def db(self):
        if threading.get_ident() == self._owner:
            return self._db
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(Path(self._path), writer=True)  # it writes: not a read-only reader
        return db

    @staticmethod
    def key(namespace: str, prompt: Prompt, sample: int, params: tuple) -> str:
        blob = json.dumps([namespace, prompt, sample, list(params)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        found = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            cur = self.db.execute(f"select key, text, n_tokens, finish_reason, error, retries, usage, endpoint, "
                                  f"served_model from {TABLE} where key in ({marks})", part)
            for key, text, n_tokens, finish_reason, error, retries, usage, endpoint, served in cur.fetchall():
                found[key] = {"text": text, "n_tokens": n_tokens, "finish_reason": finish_reason, "error": error,
                              "retries": retries or 0, "usage": json.loads(usage) if usage else None,
                              "endpoint": endpoint, "served_model": served}
        return found

    def put_many(self, rows: list[dict]) -> None:
        # One writer at a time: a transaction whose read snapshot another thread's commit outdated
        # would fail at once (SQLITE_BUSY_SNAPSHOT), not wait.
        with self._write, self.db.atomic():
            self.db[TABLE].insert_all(
                [{**r, "usage": json.dumps(r["usage"]) if r.get("usage") else None} for r in rows], replace=True)


class CheckpointedEngine:
    """An Engine that keeps each finished part of its generations.

    Engines that seed per request (vllm, openai) report each prompt as it finishes,
    and it is kept at once. The transformers engine seeds per batch, so it generates
    in chunks of whole batches, each seeded by its first prompt: a resumed stage
    forms the same chunks and samples exactly as an uninterrupted one.
    """

    def __init__(self, inner: Engine, checkpoint: Checkpoint):
        self.inner, self.checkpoint = inner, checkpoint
        self.name, self.model_path = inner.name, inner.model_path
        self.seeds_per_request = inner.seeds_per_request
        self.parallel_calls = getattr(inner, "parallel_calls", True)
        if hasattr(inner, "choice_probs"):
            # Read again on a resume rather than kept: one forward pass (or one-token request) each.
            self.choice_probs = inner.choice_probs

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate", on_done=None):
        params = (sampling.temperature, sampling.top_p, sampling.max_new_tokens, sampling.seed)
        keys = [[Checkpoint.key(f"{self.name}|{self.model_path}", p, j, params) for j in range(n)] for p in prompts]
        done = self.checkpoint.get_many([k for row in keys for k in row])
        out: list[list[Completion | None]] = [[None] * n for _ in prompts]
        for i, row in enumerate(keys):
            if all(k in done for k in row):
                out[i] = [Completion(done[k]["text"], done[k]["n_tokens"], done[k]["finish_reason"],
                                     done[k]["error"], done[k]["retries"], done[k]["usage"],
                                     endpoint=done[k]["endpoint"], served_model=done[k]["served_model"])
                          for k in row]
        todo = [i for i, row in enumerate(out) if row[0] is None]

        def keep(indices: list[int], results: list[list[Completion]]) -> None:
            rows = []
            for i, completions in zip(indices, results):
                out[i] = completions
                rows += [{"key": keys[i][j], "text": x.text, "n_tokens": x.n_tokens, "finish_reason": x.finish_reason,
                          "error": x.error, "retries": x.retries, "usage": x.usage, "endpoint": x.endpoint,
                          "served_model": x.served_model} for j, x in enumerate(completions)]
            self.checkpoint.put_many(rows)
            failpoints.hit("generated")

        if self.seeds_per_request:
            # Each prompt is kept the moment it is done: its samples do not depend on the others.
            self.inner.generate([prompts[i] for i in todo], n, sampling, desc=desc,
                                on_done=lambda local, cs: keep([todo[local]], [cs]))
        else:
            # Kept only as whole chunks: a resumed stage must form the same chunks, with the same seeds.
            size = self.inner.chunk_prompts(n)
            chunks = [todo[s : s + size] for s in range(0, len(todo), size)]
            finished = len(prompts) - len(todo)
            for chunk in chunks:
                # Seeded by the chunk's first prompt (not by where the model lives), so a chunk samples
                # alike whether or not a resume preceded it, in any run folder.
                first = json.dumps(prompts[chunk[0]], sort_keys=True, ensure_ascii=False)
                seed = (sampling.seed + int(hashlib.sha256(first.encode()).hexdigest()[:8], 16)) % (2**31)
                results = self.inner.generate([prompts[i] for i in chunk], n,
                                              Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens,
                                                       seed), desc=f"{desc} [{finished}/{len(prompts)}]")
                keep(chunk, results)
                finished += len(chunk)
        if on_done:
            for i, row in enumerate(out):
                on_done(i, row)
        return out

    def close(self) -> None:
        self.inner.close()
