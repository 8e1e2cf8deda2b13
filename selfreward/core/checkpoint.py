"""Generations checkpointed while a stage runs.

A stage still commits its outputs in one transaction; this scratch table only
keeps the generations a kill would otherwise throw away (hours of GPU judging,
or paid API calls). Each finished chunk of prompts (engines) or each finished
request (API) is written at once, keyed by everything that determines it; a
resumed stage takes those from here and generates only the rest. The table is
emptied in the transaction that commits a stage.
"""

from __future__ import annotations

import hashlib
import json

from selfreward.backends.engines import Completion, Engine, Prompt, Sampling

TABLE = "generation_checkpoint"


class Checkpoint:
    def __init__(self, db):
        self.db = db

    @staticmethod
    def key(namespace: str, prompt: Prompt, sample: int, params: tuple) -> str:
        blob = json.dumps([namespace, prompt, sample, list(params)], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        found = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            cur = self.db.execute(f"select key, text, n_tokens, finish_reason, usage from {TABLE} "
                                  f"where key in ({marks})", part)
            for key, text, n_tokens, finish_reason, usage in cur.fetchall():
                found[key] = {"text": text, "n_tokens": n_tokens, "finish_reason": finish_reason,
                              "usage": json.loads(usage) if usage else None}
        return found

    def put_many(self, rows: list[dict]) -> None:
        with self.db.atomic():
            self.db[TABLE].insert_all(
                [{**r, "usage": json.dumps(r["usage"]) if r.get("usage") else None} for r in rows], replace=True)


class CheckpointedEngine:
    """An Engine that generates chunk by chunk and keeps each finished chunk."""

    def __init__(self, inner: Engine, checkpoint: Checkpoint):
        self.inner, self.checkpoint = inner, checkpoint
        self.model_path = inner.model_path

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, desc: str = "generate"):
        params = (sampling.temperature, sampling.top_p, sampling.max_new_tokens, sampling.seed)
        keys = [[Checkpoint.key(self.model_path, p, j, params) for j in range(n)] for p in prompts]
        done = self.checkpoint.get_many([k for row in keys for k in row])
        out: list[list[Completion | None]] = [[None] * n for _ in prompts]
        for i, row in enumerate(keys):
            if all(k in done for k in row):
                out[i] = [Completion(done[k]["text"], done[k]["n_tokens"], done[k]["finish_reason"]) for k in row]
        todo = [i for i, row in enumerate(out) if row[0] is None]
        size = self.inner.chunk_prompts(n)
        chunks = [todo[s : s + size] for s in range(0, len(todo), size)]
        for c, chunk in enumerate(chunks):
            # Seeded by the chunk's first prompt (not by where the model lives), so a chunk samples
            # alike whether or not a resume preceded it, in any run folder.
            first = json.dumps(prompts[chunk[0]], sort_keys=True, ensure_ascii=False)
            seed = (sampling.seed + int(hashlib.sha256(first.encode()).hexdigest()[:8], 16)) % (2**31)
            outs = self.inner.generate([prompts[i] for i in chunk], n,
                                       Sampling(sampling.temperature, sampling.top_p, sampling.max_new_tokens, seed),
                                       desc=f"{desc} [{len(prompts) - len(todo) + sum(map(len, chunks[:c]))}"
                                            f"/{len(prompts)}]")
            rows = []
            for i, per in zip(chunk, outs):
                out[i] = per
                rows += [{"key": keys[i][j], "text": x.text, "n_tokens": x.n_tokens,
                          "finish_reason": x.finish_reason, "usage": None} for j, x in enumerate(per)]
            self.checkpoint.put_many(rows)
        return out

    def close(self) -> None:
        self.inner.close()
