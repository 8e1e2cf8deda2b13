"""What every stage gets: the run, its config, and the engines and judges it keeps loaded."""

from __future__ import annotations

import time
import zlib
from contextlib import contextmanager

from selfreward.backends.engines import Engine, make_engine
from selfreward.backends.judges import Judge, build_judge, judge_kind
from selfreward.config import Config
from selfreward.core.checkpoint import Checkpoint, CheckpointedEngine
from selfreward.core.store import Run
from selfreward.prompts import Template, load_template


class Context:
    """Keeps one policy engine (one model) loaded across stages: a vLLM server for M_t
    serves self-instruct, candidates, judging and the next eval alike, and is ended
    only when another model is needed or training needs the memory. Where vLLM servers
    swap weights (vllm_swap_weights), release() parks the engine instead of ending it,
    and the next model is loaded into it in place."""

    def __init__(self, run: Run, cfg: Config, checkpoint: bool = False):
        """checkpoint: keep each finished part of a stage's generations while it runs (the loop does)."""
        self.run, self.cfg = run, cfg
        self.stopped: str | None = None  # why the loop ended early (the promotion gate's patience ran out)
        self.checkpoint = Checkpoint(run.db) if checkpoint else None
        self._engine: Engine | None = None
        self._engine_model: str | None = None
        self._parked: Engine | None = None  # a released engine that can take another model's weights
        self._api: Engine | None = None
        self._judges: dict[str, Judge] = {}
        self._starts: list[dict] = []  # engine starts since the current stage began
        self._replicas: dict[str, dict] = {}  # per-replica counts since the current stage began (by URL)

    def seed(self, round: int, stage: str) -> int:
        """A stable seed per (run seed, round, stage): a resumed stage samples the same way."""
        return zlib.crc32(f"{self.cfg.seed}:{round}:{stage}".encode()) % (2**31)

    def template(self, name: str) -> Template:
        return load_template(name)

    @contextmanager
    def stage(self, round: int, name: str):
        """run.stage, plus the engine starts the stage paid for and, for a pool of servers, each
        replica's requests and failures in its detail (status --stages)."""
        self._starts, self._replicas = [], {}
        for engine in (self._engine, self._api):
            self._tally(engine)
        self._replicas = {}  # what came before this stage is not its own
        with self.run.stage(round, name) as commit:
            yield commit
            for engine in (self._engine, self._api):
                self._tally(engine)
            if self._starts:
                commit.detail = {**commit.detail, "engine_starts": self._starts}
            if any(row["requests"] for row in self._replicas.values()):
                commit.detail = {**commit.detail, "replicas": list(self._replicas.values())}

    def _tally(self, engine: Engine | None) -> None:
        """Add a pool's per-replica counts since the last tally to the stage's."""
        from selfreward.backends.engines.openai import OpenAIEngine

        inner = engine.inner if isinstance(engine, CheckpointedEngine) else engine
        if not isinstance(inner, OpenAIEngine) or len(inner.replicas) == 1:
            return
        for row in inner.replica_counts(since_last=True):
            kept = self._replicas.setdefault(row["url"], {"url": row["url"]})
            for key in ("requests", "answered", "failures", "outs"):
                kept[key] = kept.get(key, 0) + row[key]

    def _wrap(self, engine: Engine) -> Engine:
        return CheckpointedEngine(engine, self.checkpoint) if self.checkpoint else engine

    def engine(self, model: str) -> Engine:
        """The policy engine serving `model` (M_t); starts it if another model, or none, is loaded."""
        if self._engine is None or self._engine_model != model:
            self.release()
            path = self.run.model_path(model)
            engine, self._parked = self._parked, None
            if engine is not None:
                try:
                    swap_s = engine.swap(path) if engine.model_path != str(path) else 0.0
                except BaseException:
                    engine.close()
                    raise
                self._starts.append({"engine": self.cfg.engine, "model": model, "swap_s": round(swap_s, 1)})
            else:
                t0 = time.perf_counter()
                engine = make_engine(self.cfg, path, self.run.path)
                self._starts.append({"engine": self.cfg.engine, "model": model,
                                     "start_s": round(time.perf_counter() - t0, 1)})
            self._engine, self._engine_model = self._wrap(engine), model
        return self._engine

    def judge(self, model: str) -> Judge:
        """The configured judge; for the self judge, `model` (M_t) is the one judging."""
        if not judge_kind(self.cfg).uses_policy:
            model = "-"  # one instance serves every round
        if model not in self._judges:
            self._judges[model] = build_judge(self.cfg, lambda kind: self._engine_for(kind, model), model)
        return self._judges[model]

    def eval_judge(self) -> Judge:
        """The independent judge of the actor's win rates (eval_judge): never the policy. An LLM judge
        compares the two answers directly (pairwise, both orders)."""
        import dataclasses

        if "eval:" not in self._judges:
            cfg = self.cfg
            cfg = dataclasses.replace(cfg, judge=cfg.eval_judge, judge_mode="pairwise", judge_logprobs="no",
                                      judge_model=cfg.eval_judge_model)
            self._judges["eval:"] = build_judge(cfg, lambda kind: self._engine_for(kind, "-"), "eval")
        return self._judges["eval:"]

    def parent(self, t: int) -> str:
        """The model round t trains from: M_{t-1}, unless the promotion gate kept an earlier one."""
        row = self.run.db.execute("select model_in from rounds where round = ?", [t]).fetchone()
        return row[0] if row and row[0] else f"M{t - 1}"

    def _engine_for(self, kind: str, model: str) -> Engine:
        if kind == "policy":
            return self.engine(model)
        if self._api is None:
            self._api = self._wrap(make_engine(self.cfg, "", name="openai"))
        return self._api

    def judge_provenance(self, model: str, seed: int) -> dict:
        """What an auditor needs to reproduce a judgment: the weights' hash, sampling and seed, version."""
        import json

        from selfreward import __version__

        cfg, kind = self.cfg, judge_kind(self.cfg)
        sha = self.run.model(model)["sha256"] if kind.uses_policy else kind.weights(cfg)
        sampling = None
        if kind.llm:
            sampling = json.dumps({"temperature": cfg.judge_temperature, "top_p": cfg.judge_top_p,
                                   "max_new_tokens": cfg.judge_max_new_tokens, "seed": seed,
                                   "mode": cfg.judge_mode,
                                   "engine": cfg.engine if kind.uses_policy else cfg.judge})
        return {"judge_model_sha": sha, "sampling": sampling, "version": __version__}

    def release(self) -> None:
        """End the policy engine and free model-backed judges (before training, which needs the memory)."""
        # A scripted judge holds no model and keeps its place in its script; an API judge holds a client only.
        if judge_kind(self.cfg).holds_memory:
            self._judges = {}
        if self._engine is not None:
            self._tally(self._engine)
            inner = self._engine.inner if isinstance(self._engine, CheckpointedEngine) else self._engine
            if getattr(inner, "swappable", False):
                self._parked = inner  # idle through training, then loads the next model in place
            else:
                self._engine.close()
            self._engine = self._engine_model = None
            from selfreward.backends.models import free_memory

            free_memory()

    def close(self) -> None:
        """Release everything, the API client too (end of a command)."""
        self.release()
        if self._parked is not None:
            self._parked.close()
            self._parked = None
        if self._api is not None:
            self._api.close()
            self._api = None
